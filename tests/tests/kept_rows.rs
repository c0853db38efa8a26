//! The decoder's last layer computes only the rows whose hidden states are wanted (a prompt's last position,
//! the sampled rows of an engine step, none for a prompt's earlier chunks): those rows must come out as they
//! do from a pass over all rows, and the cache must still get every row's keys and values.

use afnext_e2e::{ckpt, max_tensor_diff, test_device};
use afnext_model::paged::{PagedKv, SeqStep};
use afnext_model::AfNext;
use candle_core::{DType, Tensor};

/// On the CPU the same bits; elsewhere (batched GPU products may round per shape) within `tol`.
fn assert_same(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    if got.device().is_cpu() {
        let bits = |t: &Tensor| -> Vec<u32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert!(bits(got) == bits(want), "{what}: bits differ");
    } else {
        let d = max_tensor_diff(got, want);
        assert!(d <= tol, "{what}: differs by {d}");
    }
}

fn select(t: &Tensor, dim: usize, rows: &[usize]) -> Tensor {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    t.index_select(&Tensor::new(idx.as_slice(), t.device()).unwrap(), dim)
        .unwrap()
}

/// The single-sequence cache: chunks longer than the few-query kernel's limit (blocked kernel) and shorter,
/// keeping no row, the last, or several; a later chunk over both caches checks that the keys and values of
/// the rows not kept were stored all the same.
#[test]
fn kept_rows_of_the_contiguous_cache_are_the_rows_of_the_full_pass() {
    for ck in ["tiny-a", "tiny-b"] {
        for dtype in [DType::F32, DType::BF16] {
            let model = AfNext::load(&ckpt(ck), dtype, &test_device()).unwrap();
            let v = model.cfg.text.vocab_size as u32;
            let ids: Vec<u32> = (0..80u32).map(|i| (i * 41 + 7) % v).collect();
            let emb = model.decoder.embed(&ids).unwrap();
            let (mut all, mut some) = (model.new_cache(), model.new_cache());
            let chunks: [(usize, usize, &[usize]); 5] = [
                (0, 23, &[]),
                (23, 30, &[0, 5, 29]),
                (53, 7, &[6]),
                (60, 10, &[]),
                (70, 10, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            ];
            for (start, len, rows) in chunks {
                let x = emb.narrow(1, start, len).unwrap();
                let want = model.decoder.forward(&x, &mut all).unwrap();
                let got = model.decoder.forward_rows(&x, &mut some, rows).unwrap();
                let what = format!("{ck} {dtype:?} chunk at {start} rows {rows:?}");
                assert_same(&got, &select(&want, 1, rows), 1e-5, &what);
            }
        }
    }
}

/// An engine step mixing a long chunk, a short chunk and a decode row in the paged pool, keeping some rows of
/// each; the next step over both pools (all rows) checks the stored keys and values.
#[test]
fn kept_rows_of_a_paged_step_are_the_rows_of_the_full_step() {
    for ck in ["tiny-a", "tiny-b"] {
        for dtype in [DType::F32, DType::BF16] {
            let model = AfNext::load(&ckpt(ck), dtype, &test_device()).unwrap();
            let v = model.cfg.text.vocab_size as u32;
            let pool = || PagedKv::new(&model.cfg.text, 64, 4, dtype, &test_device()).unwrap();
            let (all, some) = (pool(), pool());
            let tables: [Vec<u32>; 3] = [
                (0..12).map(|i| 63 - 2 * i).collect(),
                (0..12).map(|i| 2 * i).collect(),
                (0..12).map(|i| 2 * i + 1).collect(),
            ];
            let rows = |n: usize, salt: u32| {
                let ids: Vec<u32> = (0..n as u32).map(|i| (i * 29 + salt) % v).collect();
                model.decoder.embed_rows(&ids).unwrap()
            };
            let seq = |i: usize, start, len| SeqStep {
                start,
                len,
                block_table: tables[i].clone(),
            };
            // Sequence 2 has a prompt already, so that its row in the next step is a decode row.
            let first = [seq(2, 0, 9)];
            let x = rows(9, 5);
            for kv in [&all, &some] {
                model.decoder.forward_paged(&x, &first, kv).unwrap();
            }
            let step = [seq(0, 0, 30), seq(1, 0, 6), seq(2, 9, 1)];
            let x = Tensor::cat(&[rows(30, 1), rows(6, 2), rows(1, 3)], 0).unwrap();
            let keep = [3, 29, 35, 36];
            let want = model.decoder.forward_paged(&x, &step, &all).unwrap();
            let got = model
                .decoder
                .forward_paged_rows(&x, &step, &some, &keep)
                .unwrap();
            let what = format!("{ck} {dtype:?} mixed step");
            assert_same(&got, &select(&want, 0, &keep), 1e-5, &what);
            let next = [seq(0, 30, 1), seq(1, 6, 1), seq(2, 10, 1)];
            let x = rows(3, 9);
            let want = model.decoder.forward_paged(&x, &next, &all).unwrap();
            let got = model.decoder.forward_paged(&x, &next, &some).unwrap();
            assert_same(&got, &want, 1e-5, &format!("{what}, next step"));
            let none = model
                .decoder
                .forward_paged_rows(&x, &next, &some, &[])
                .unwrap();
            assert_eq!(none.dims(), &[0, model.cfg.text.hidden_size]);
        }
    }
}

/// Rows out of order or past the pass are an error, not a panic or a silent reordering.
#[test]
fn bad_kept_rows_are_refused() {
    let model = AfNext::load(&ckpt("tiny-a"), DType::F32, &test_device()).unwrap();
    let emb = model.decoder.embed(&[1, 2, 3]).unwrap();
    for rows in [&[2usize, 1][..], &[1, 1], &[3]] {
        let mut cache = model.new_cache();
        let err = model
            .decoder
            .forward_rows(&emb, &mut cache, rows)
            .unwrap_err();
        assert!(err.to_string().contains("ascending"), "{rows:?}: {err}");
    }
}
