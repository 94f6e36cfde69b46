//! Throughput of the proxy's copy loops over loopback TCP, against tokio's own
//! `copy_bidirectional`: one 64 MiB transfer `app -> proxy -> server` per iteration, the
//! proxy running the loop under test. Also the per-connection cost of copy buffers, pooled
//! against freshly allocated.
//!
//! Run with `cargo bench -p proxy --bench copy`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proxy::copy::{self, CopyConfig, DEFAULT_BUFFER_SIZE, Transferred};
use proxy::splice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LEN: usize = 64 << 20;

#[derive(Clone, Copy)]
enum Loop {
    Copy,
    Splice,
    Tokio,
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// One connection moving `LEN` bytes from the app to the server through the proxy loop.
async fn transfer(which: Loop) -> Duration {
    let (mut app, mut client) = tcp_pair().await;
    let (mut upstream, mut server) = tcp_pair().await;
    let start = Instant::now();
    let proxy = tokio::spawn(async move {
        let cfg = CopyConfig::default();
        let counts = Transferred::default();
        match which {
            Loop::Copy => {
                copy::bidirectional(&mut client, &mut upstream, &cfg, &counts).await;
            }
            Loop::Splice => {
                splice::bidirectional(&mut client, &mut upstream, &cfg, &counts).await;
            }
            Loop::Tokio => {
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .unwrap();
            }
        }
    });
    let sender = tokio::spawn(async move {
        let chunk = vec![0x5au8; 256 * 1024];
        for _ in 0..LEN / chunk.len() {
            app.write_all(&chunk).await.unwrap();
        }
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = server.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, LEN);
    server.shutdown().await.unwrap();
    sender.await.unwrap();
    proxy.await.unwrap();
    start.elapsed()
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("loopback_64MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for (name, which) in [
        ("copy", Loop::Copy),
        ("splice", Loop::Splice),
        ("tokio_copy_bidirectional", Loop::Tokio),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += transfer(which).await;
                }
                total
            })
        });
    }
    g.finish();
}

/// What the pool saves each time a direction starts moving bytes: a 64 KiB buffer, pooled
/// or allocated and zeroed.
fn buffers(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_buffer_per_burst");
    g.bench_function("pooled", |b| {
        b.iter(|| black_box(copy::pool::take(black_box(DEFAULT_BUFFER_SIZE))))
    });
    g.bench_function("fresh", |b| {
        // One byte more than the pooled size: never pooled, same cost as no pool.
        b.iter(|| black_box(copy::pool::take(black_box(DEFAULT_BUFFER_SIZE + 1))))
    });
    g.finish();
}

criterion_group!(benches, throughput, buffers);
criterion_main!(benches);
