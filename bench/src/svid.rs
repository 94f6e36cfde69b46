//! The Workload API and the CA: a real `ferry agent` (with an entry for this uid) serves
//! `FetchX509SVID` on its Unix socket, measured with the `spiffe` crate's client from a new
//! connection to the first `X509SVIDResponse` (one loop for latency, N concurrent loops for
//! fetches per second); and the software CA's X.509- and JWT-SVID issuance rate, in process
//! through `attest::Authority` (what the agent calls for each SVID it issues).
//!
//! ferry only: there is no Envoy counterpart (Envoy takes its SVIDs over SDS from an agent).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use registry::spiffe::{SpiffeId, TrustDomain};
use testkit::config::Entry;
use testkit::mesh::FerryZone;

use crate::mesh::Variant;
use crate::procs::ferry_binary;
use crate::report::Report;

const TD: &str = "local.domain";
const ID: &str = "spiffe://local.domain/ns/bench/sa/svid";

/// `ferry-bench svid` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Concurrent fetch loops for fetches per second.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    #[command(flatten)]
    pub out: crate::report::Output,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            duration: 5.0,
            connections: 8,
            out: crate::report::Output::default(),
        }
    }
}

/// One `FetchX509SVID` on a new connection until the first response; its time.
async fn fetch_once(endpoint: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .context("connect to the Workload API")?;
    client.fetch_x509_svid().await.context("FetchX509SVID")?;
    Ok(t.elapsed())
}

/// `loops` concurrent fetch loops for `d`: (fetches, elapsed, latency histogram in µs).
async fn fetch_loops(
    endpoint: &str,
    loops: usize,
    d: Duration,
) -> anyhow::Result<(u64, Duration, Histogram<u64>)> {
    let start = Instant::now();
    let end = start + d;
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let ep = endpoint.to_owned();
            tokio::spawn(async move {
                let mut h = crate::load::histogram()?;
                while Instant::now() < end {
                    let t = fetch_once(&ep).await?;
                    h.record(t.as_micros().max(1) as u64)?;
                }
                anyhow::Ok(h)
            })
        })
        .collect();
    let mut all = crate::load::histogram()?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok((all.len(), start.elapsed(), all))
}

/// Issues SVIDs with `issue` for `d` on a blocking thread: issued per second.
async fn issue_rate<F>(d: Duration, issue: F) -> anyhow::Result<f64>
where
    F: Fn() -> Result<(), attest::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < d {
            issue()?;
            n += 1;
        }
        anyhow::Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .await?
}

/// Runs the scenario.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.duration > 0.0 && args.connections > 0,
        "--duration and --connections must be positive"
    );
    let d = Duration::from_secs_f64(args.duration);
    let mut r = Report::new("svid");
    let v = Variant::Ferry;

    eprintln!("starting ferry agent ...");
    let uid = format!("unix:uid:{}", testkit::workload::my_uid());
    let outbound = ([127, 0, 0, 1], testkit::free_port()).into();
    let zone = FerryZone::start(
        &ferry_binary()?,
        testkit::tempdir()?,
        TD,
        outbound,
        &[Entry::new(ID, [uid])],
        "",
    )
    .await;
    let endpoint = format!("unix://{}", zone.socket.display());
    // The agent may still be issuing its first SVIDs: wait for one fetch to succeed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fetch_once(&endpoint).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!(
                    "no X.509-SVID from the agent: {e:#}\n{}",
                    zone.agent.log_tail(40)
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    for loops in [1, args.connections] {
        let case = format!("FetchX509SVID-{loops}conn");
        eprintln!("{case} ...");
        let (n, elapsed, h) = fetch_loops(&endpoint, loops, d).await?;
        r.record(
            &case,
            "fetches_per_s",
            true,
            v,
            n as f64 / elapsed.as_secs_f64(),
        );
        r.record(
            &case,
            "fetch_p50_us",
            false,
            v,
            h.value_at_quantile(0.5) as f64,
        );
        r.record(
            &case,
            "fetch_p99_us",
            false,
            v,
            h.value_at_quantile(0.99) as f64,
        );
        if loops == 1 && args.connections == 1 {
            break;
        }
    }
    drop(zone);

    eprintln!("software CA issuance ...");
    let dir = testkit::tempdir()?;
    let config = attest::AuthorityConfig::new(
        TrustDomain::parse("example.org")?,
        dir.path().to_owned(),
        Duration::from_secs(24 * 3600),
    );
    let ca = attest::Authority::open(config.clone(), config.software_keys())
        .context("open the software CA")?;
    let id = SpiffeId::parse("spiffe://example.org/ns/bench/sa/app")?;
    let (c, i) = (ca.clone(), id.clone());
    let x509 = issue_rate(d, move || {
        c.issue_x509_svid(&i, Duration::from_secs(3600)).map(drop)
    })
    .await?;
    r.record("software-CA", "x509_svids_per_s", true, v, x509);
    let aud = vec!["bench".to_owned()];
    let jwt = issue_rate(d, move || {
        ca.issue_jwt_svid(&id, &aud, Duration::from_secs(300))
            .map(drop)
    })
    .await?;
    r.record("software-CA", "jwt_svids_per_s", true, v, jwt);
    Ok(r)
}
