//! The TCP group over real loopback sockets, one thread per rank.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afnext_collectives::tcp::{TcpConfig, TcpGroup};
use afnext_collectives::{Collective, CollectiveError};
use candle_core::{Device, Tensor};

fn group(world: usize, cfg: TcpConfig) -> Vec<Arc<TcpGroup>> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let followers: Vec<_> = (1..world)
        .map(|r| {
            let a = addr.clone();
            std::thread::spawn(move || TcpGroup::join(r, world, &a, cfg).unwrap())
        })
        .collect();
    let mut g = vec![Arc::new(TcpGroup::lead(l, world, cfg).unwrap())];
    g.extend(followers.into_iter().map(|h| Arc::new(h.join().unwrap())));
    g
}

fn on_all<T: Send + 'static>(
    g: &[Arc<TcpGroup>],
    f: impl Fn(&TcpGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let hs: Vec<_> = g
        .iter()
        .map(|m| {
            let (m, f) = (m.clone(), f.clone());
            std::thread::spawn(move || f(&m))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn all_reduce_gather_broadcast_on_four_ranks() {
    let g = group(4, TcpConfig::default());
    let out = on_all(&g, |m| {
        let r = m.rank() as f32;
        let mut v: Vec<f32> = (0..1000).map(|i| r * 1000.0 + i as f32 * 0.5).collect();
        m.all_reduce_sum(&mut v).unwrap();
        let parts = m.all_gather(&vec![r; m.rank() + 1]).unwrap();
        let b = m
            .broadcast(2, format!("from {}", m.rank()).into_bytes())
            .unwrap();
        let t = Tensor::new(&[[r, 1.0], [2.0, r]], &Device::Cpu).unwrap();
        let s = m.all_reduce_tensor(&t).unwrap().to_vec2::<f32>().unwrap();
        let cols = Tensor::new(&[[r], [r + 10.0]], &Device::Cpu).unwrap();
        let gathered = m.all_gather_cols(&cols).unwrap().to_vec2::<f32>().unwrap();
        (v, parts, b, s, gathered)
    });
    for (v, parts, b, s, gathered) in &out {
        // The sum in rank order, computed here independently.
        let want: Vec<f32> = (0..1000)
            .map(|i| (0..4).fold(0f32, |acc, r| acc + (r as f32 * 1000.0 + i as f32 * 0.5)))
            .collect();
        assert_eq!(v, &want);
        assert_eq!(parts.len(), 4);
        for (r, p) in parts.iter().enumerate() {
            assert_eq!(p, &vec![r as f32; r + 1]);
        }
        assert_eq!(b, b"from 2");
        assert_eq!(s, &vec![vec![6.0, 4.0], vec![8.0, 6.0]]);
        assert_eq!(
            gathered,
            &vec![vec![0.0, 1.0, 2.0, 3.0], vec![10.0, 11.0, 12.0, 13.0]]
        );
    }
}

#[test]
fn a_dead_rank_fails_the_others_promptly_and_breaks_the_group() {
    let cfg = TcpConfig {
        join_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(20),
    };
    let mut g = group(3, cfg);
    // Rank 2 goes away (its sockets close, as when its process dies).
    drop(g.pop());
    let t0 = Instant::now();
    let out = on_all(&g, |m| {
        let mut v = vec![1f32; 8];
        m.all_reduce_sum(&mut v)
    });
    assert!(
        matches!(out[0], Err(CollectiveError::PeerGone { rank: 2, .. })),
        "{:?}",
        out[0]
    );
    // Rank 1 learns from rank 0 closing its link, long before the operation timeout.
    assert!(out[1].is_err());
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let mut v = vec![1f32; 8];
    let again = g[0].all_reduce_sum(&mut v).unwrap_err();
    assert!(again.to_string().contains("broken"), "{again}");
}

#[test]
fn a_stalled_rank_is_a_timeout_not_a_hang() {
    let cfg = TcpConfig {
        join_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_millis(300),
    };
    let g = group(2, cfg);
    // Rank 1 never takes part.
    let mut v = vec![0f32; 4];
    let e = g[0].all_reduce_sum(&mut v).unwrap_err();
    assert!(matches!(e, CollectiveError::Timeout { rank: 1, .. }), "{e}");
}

#[test]
fn joining_errors_name_the_problem() {
    let cfg = TcpConfig {
        join_timeout: Duration::from_millis(300),
        op_timeout: Duration::from_secs(1),
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = TcpGroup::lead(l, 3, cfg).unwrap_err().to_string();
    assert!(e.contains("ranks 1, 2 did not join"), "{e}");
    let e = TcpGroup::join(3, 2, "127.0.0.1:1", cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 3 cannot join a group of 2"), "{e}");
    // A follower that thinks the group is larger is refused.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || TcpGroup::lead(l, 2, cfg));
    let e = TcpGroup::join(1, 3, &addr, cfg).unwrap_err().to_string();
    assert!(e.contains("refused"), "{e}");
    assert!(h.join().unwrap().is_err());
}
