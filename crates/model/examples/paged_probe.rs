use std::time::Instant;
use afnext_model::paged::{PagedKv, SeqStep};
use afnext_model::{AfNext, AfNextConfig};
use candle_core::{DType, Device};

fn main() {
    let v = serde_json::json!({
        "audio_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                         "intermediate_size": 128, "num_mel_bins": 128, "max_source_positions": 1500},
        "text_config": {"vocab_size": 151672, "hidden_size": 896, "intermediate_size": 4864,
                        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1000000.0},
                        "tie_word_embeddings": true, "max_position_embeddings": 32768},
    });
    let cfg = AfNextConfig::from_json(&v).unwrap();
    let m = AfNext::random(cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let dec = &m.decoder;
    let ids: Vec<u32> = (0..40).collect();
    // contiguous
    let mut cache = m.new_cache();
    let e = dec.embed(&ids).unwrap();
    let t = Instant::now();
    let h = dec.forward(&e, &mut cache).unwrap();
    println!("contig prefill 40: {:?}", t.elapsed());
    for _ in 0..3 {
        let t = Instant::now();
        let h = dec.forward(&dec.embed(&[5]).unwrap(), &mut cache).unwrap();
        let _ = dec.logits(&h).unwrap();
        println!("contig decode: {:?}", t.elapsed());
    }
    drop(h);
    let kv = PagedKv::new(dec.config(), 100, 16, DType::F32, &Device::Cpu).unwrap();
    let table: Vec<u32> = (0..10).collect();
    let t = Instant::now();
    let h = dec.forward_paged(&dec.embed_rows(&ids).unwrap(), &[SeqStep{start:0,len:40,block_table:table.clone()}], &kv).unwrap();
    println!("paged prefill 40: {:?}", t.elapsed());
    for i in 0..3 {
        let t = Instant::now();
        let h = dec.forward_paged(&dec.embed_rows(&[5]).unwrap(), &[SeqStep{start:40+i,len:1,block_table:table.clone()}], &kv).unwrap();
        let t1 = t.elapsed();
        let _ = dec.logits(&h.narrow(0,0,1).unwrap()).unwrap();
        println!("paged decode: {:?} (+logits {:?})", t1, t.elapsed());
    }
    let seqs: Vec<SeqStep> = (0..16).map(|_| SeqStep{start:41,len:1,block_table:table.clone()}).collect();
    for _ in 0..2 {
    let t = Instant::now();
    let h = dec.forward_paged(&dec.embed_rows(&[5;16]).unwrap(), &seqs, &kv).unwrap();
    let t1 = t.elapsed();
    let _ = dec.logits(&h).unwrap();
    println!("paged decode x16: {:?} (+logits {:?})", t1, t.elapsed());
    }
}
