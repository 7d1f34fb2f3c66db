//! The destroy walk against the memory-bandwidth floor of the *same* memory: a walk over
//! N GiB of secure, touched pages (PVFAST_BENCH_GIB, default 2) beside memset and
//! streaming-store zeroing of that region's bytes, plus the walk over an empty 1 TiB region.
//! Prints walk/nt and walk/memset at the end. (On a VM the write rate differs between
//! mappings by tens of percent, so a separate buffer would not be a fair floor.) Also the
//! cost of per-thread accounting: the same walk with an account bound (as the Python layer
//! runs it) against the walk with accounting switched off, in back-to-back pairs.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvfast_core::{account, kernel, Binding, Region, Ultravisor, UvOptions, PAGE_SIZE};

fn gib() -> u64 {
    std::env::var("PVFAST_BENCH_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&g| g > 0)
        .unwrap_or(2)
}

/// Mean seconds per iteration of each measurement, for the summary.
static MEANS: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

fn record(name: &'static str, secs: f64) {
    if let Ok(mut m) = MEANS.lock() {
        m.push((name, secs));
    }
}

/// A UV with one region of `bytes`, touched, and a config over it; returns the handle.
fn setup(threads: usize, bytes: u64) -> (Ultravisor, std::sync::Arc<Region>, u64) {
    let uv = Ultravisor::new(UvOptions {
        threads,
        ..Default::default()
    })
    .expect("ultravisor");
    let region = uv.create_region(bytes).expect("region");
    region.touch(0, bytes).expect("touch");
    let info = uv.info();
    let (st, handle) = uv
        .create_config(
            &region,
            bytes,
            0x1000 | 0x100, // origin | private-space control
            0x8000,         // SCA
            info.guest_base_stor_len,
            info.var_stor_len(bytes),
        )
        .expect("create_config");
    assert!(st.is_ok());
    (uv, region, handle)
}

fn resecure(uv: &Ultravisor, region: &Region, handle: u64) {
    let r =
        kernel::import_range(uv, handle, region, 0, region.pages(), false).expect("import_range");
    assert_eq!(r.failed_pages, 0);
}

/// Medians over back-to-back triples (walk, NT zeroing of the same region on one thread, NT
/// zeroing on the UV's pool), so load from elsewhere on the machine hits every side of each
/// ratio alike. Returns (nt/walk, nt_par/walk).
fn paired(uv: &Ultravisor, region: &Region, handle: u64) -> (f64, f64) {
    let (mut r1, mut rp) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        resecure(uv, region, handle);
        let t = Instant::now();
        kernel::destroy_walk(uv, region, 0, None, None).expect("walk");
        let walk = t.elapsed().as_secs_f64();
        let t = Instant::now();
        region.bench_zero_all(true, false).expect("nt");
        let nt = t.elapsed().as_secs_f64();
        let t = Instant::now();
        region.bench_zero_all(true, true).expect("nt_par");
        let nt_par = t.elapsed().as_secs_f64();
        r1.push(nt / walk);
        rp.push(nt_par / walk);
    }
    r1.sort_by(f64::total_cmp);
    rp.sort_by(f64::total_cmp);
    (r1[r1.len() / 2], rp[rp.len() / 2])
}

/// Median over back-to-back pairs (order alternating) of walk time with an account bound over
/// walk time with accounting off: the accounting's overhead as a ratio (1.0 = none).
fn paired_accounting(uv: &Ultravisor, region: &Region, handle: u64) -> f64 {
    let acct = uv.new_account(0);
    let walk = |on: bool| {
        account::set_enabled(on);
        let prev = account::bind(Binding {
            thread: on.then(|| std::sync::Arc::clone(&acct)),
            vm: None,
        });
        resecure(uv, region, handle);
        let t = Instant::now();
        kernel::destroy_walk(uv, region, 0, None, None).expect("walk");
        let secs = t.elapsed().as_secs_f64();
        account::bind(prev);
        account::set_enabled(true);
        secs
    };
    let mut ratios = Vec::new();
    for i in 0..11 {
        let (on, off) = if i % 2 == 0 {
            let on = walk(true);
            (on, walk(false))
        } else {
            let off = walk(false);
            (walk(true), off)
        };
        ratios.push(on / off);
    }
    assert!(acct.snapshot().ptes > 0, "the bound account was charged");
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

fn bench(c: &mut Criterion) {
    let gib = gib();
    let bytes = gib << 30;
    let pages = bytes / PAGE_SIZE as u64;
    let (uv, region, handle) = setup(0, bytes);

    let mut g = c.benchmark_group("zeroing");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Bytes(bytes));

    g.bench_function(format!("destroy_walk_{gib}GiB"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                resecure(&uv, &region, handle);
                let t = Instant::now();
                let w = kernel::destroy_walk(&uv, &region, 0, None, None).expect("walk");
                total += t.elapsed();
                assert_eq!(w.destroyed, pages);
            }
            record("walk", total.as_secs_f64() / iters as f64);
            total
        })
    });
    for (name, key, nt, par) in [
        (format!("memset_{gib}GiB"), "memset", false, false),
        (format!("nt_zero_{gib}GiB"), "nt", true, false),
        (format!("nt_zero_parallel_{gib}GiB"), "nt_par", true, true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    region.bench_zero_all(black_box(nt), par).expect("zero");
                }
                let total = t.elapsed();
                record(key, total.as_secs_f64() / iters as f64);
                total
            })
        });
    }
    g.finish();

    let (nt, nt_par) = paired(&uv, &region, handle);
    record("paired_median", nt);
    record("paired_median_par", nt_par);
    record("accounting_ratio", paired_accounting(&uv, &region, handle));
    uv.release_region(&region).expect("release");
    drop(region);
    let (uv1, region1, handle1) = setup(1, bytes);
    record("paired_median_1thread", paired(&uv1, &region1, handle1).0);
    uv1.release_region(&region1).expect("release");
    drop((uv1, region1));

    let mut g = c.benchmark_group("empty");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    let tib = uv.create_region(1 << 40).expect("1 TiB region");
    g.bench_function("destroy_walk_empty_1TiB", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(kernel::destroy_walk(&uv, &tib, 0, None, None).expect("walk"));
            }
            let total = t.elapsed();
            record("empty_1tib", total.as_secs_f64() / iters as f64);
            total
        })
    });
    g.finish();

    summary(bytes);
}

fn summary(bytes: u64) {
    let Ok(m) = MEANS.lock() else { return };
    let best = |name: &str| {
        m.iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .fold(f64::INFINITY, f64::min)
    };
    let (walk, memset, nt, nt_par, empty) = (
        best("walk"),
        best("memset"),
        best("nt"),
        best("nt_par"),
        best("empty_1tib"),
    );
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "\n== pvfast destroy walk vs zeroing the same region ({} GiB, best sample of each) ==",
        bytes >> 30
    );
    println!("walk                 {:8.2} GB/s (UV pool)", gbs(walk));
    println!("memset               {:8.2} GB/s (1 thread)", gbs(memset));
    println!("nt zero              {:8.2} GB/s (1 thread)", gbs(nt));
    println!("nt zero parallel     {:8.2} GB/s (UV pool)", gbs(nt_par));
    println!("ratio walk/nt        {:.3}", nt / walk);
    println!("ratio walk/nt_par    {:.3}", nt_par / walk);
    println!("ratio walk/memset    {:.3}", memset / walk);
    let paired_line = |what: &str, key: &str| println!("{what:<34} {:.3}", best(key));
    paired_line("ratio walk/nt paired (UV pool)", "paired_median");
    paired_line("ratio walk/nt_par paired (UV pool)", "paired_median_par");
    paired_line(
        "ratio walk/nt paired (1-thread UV)",
        "paired_median_1thread",
    );
    println!("  (paired = median of 7 back-to-back runs of each)");
    println!("empty 1 TiB walk     {:.3} ms", empty * 1e3);
    let acct = best("accounting_ratio");
    println!(
        "accounting overhead  {:+.1} % (walk with an account bound / walk with accounting off, median of 11 pairs)",
        (acct - 1.0) * 100.0
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
