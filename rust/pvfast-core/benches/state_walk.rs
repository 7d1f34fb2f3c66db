//! The destroy walk over a state-only region (no page holds data, so the walk is all page-state
//! transitions) in pages/s, against its floor measured in the same run: a plain Rust loop doing
//! the same atomic transition (compare-exchange of the SECURE word to the NONSECURE word) over a
//! `u32` array of the same length, on one thread and on as many threads as the UV's pool.
//! PVFAST_STATE_GIB (default 64) sets the guest size; every page is secure before each walk.
//! Prints the rates and the paired ratios (median of back-to-back runs) at the end.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvfast_core::{kernel, MemoryMode, Region, Ultravisor, UvOptions, PAGE_SIZE};
use rayon::prelude::*;

fn gib() -> u64 {
    std::env::var("PVFAST_STATE_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&g| g > 0)
        .unwrap_or(64)
}

static MEANS: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

fn record(name: &'static str, secs: f64) {
    if let Ok(mut m) = MEANS.lock() {
        m.push((name, secs));
    }
}

// The floor's words: what a secure page of configuration 1 and a non-secure present page look
// like (PRESENT | kind << 28 | owner), the same transition the walk makes.
const SECURE_WORD: u32 = (1 << 31) | (1 << 28) | 1;
const NONSECURE_WORD: u32 = 1 << 31;

fn setup(bytes: u64) -> (Ultravisor, Arc<Region>, u64) {
    let uv = Ultravisor::new(UvOptions::default()).expect("ultravisor");
    let region = uv
        .create_region_mode(bytes, MemoryMode::State)
        .expect("region");
    region.touch(0, bytes).expect("touch");
    let info = uv.info();
    let (st, handle) = uv
        .create_config(
            &region,
            bytes,
            0x1000,
            0,
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

fn floor_loop(words: &[AtomicU32]) -> u64 {
    let mut n = 0;
    for w in words {
        if w.compare_exchange(
            SECURE_WORD,
            NONSECURE_WORD,
            Ordering::Acquire,
            Ordering::Relaxed,
        )
        .is_ok()
        {
            n += 1;
        }
    }
    n
}

fn floor_parallel(pool: &rayon::ThreadPool, words: &[AtomicU32]) -> u64 {
    pool.install(|| words.par_chunks(1 << 14).map(floor_loop).sum())
}

fn rearm(words: &[AtomicU32]) {
    for w in words {
        w.store(SECURE_WORD, Ordering::Relaxed);
    }
}

fn bench(c: &mut Criterion) {
    let gib = gib();
    let bytes = gib << 30;
    let pages = bytes / PAGE_SIZE as u64;
    let (uv, region, handle) = setup(bytes);
    let words: Vec<AtomicU32> = (0..pages).map(|_| AtomicU32::new(SECURE_WORD)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");

    let mut g = c.benchmark_group("state_walk");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(pages));
    g.bench_function(format!("destroy_walk_state_{gib}GiB"), |b| {
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
    for (name, key, parallel) in [
        (format!("floor_cas_loop_{gib}GiB"), "floor", false),
        (format!("floor_cas_parallel_{gib}GiB"), "floor_par", true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    rearm(&words);
                    let t = Instant::now();
                    let n = if parallel {
                        floor_parallel(&pool, black_box(&words))
                    } else {
                        floor_loop(black_box(&words))
                    };
                    total += t.elapsed();
                    assert_eq!(n, pages);
                }
                record(key, total.as_secs_f64() / iters as f64);
                total
            })
        });
    }
    g.finish();

    // Paired: walk, 1-thread floor, parallel floor back to back, 7 times; medians of the ratios.
    let (mut r1, mut rp) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        resecure(&uv, &region, handle);
        let t = Instant::now();
        kernel::destroy_walk(&uv, &region, 0, None, None).expect("walk");
        let walk = t.elapsed().as_secs_f64();
        rearm(&words);
        let t = Instant::now();
        floor_loop(&words);
        let floor = t.elapsed().as_secs_f64();
        rearm(&words);
        let t = Instant::now();
        floor_parallel(&pool, &words);
        let floor_par = t.elapsed().as_secs_f64();
        r1.push(floor / walk);
        rp.push(floor_par / walk);
    }
    r1.sort_by(f64::total_cmp);
    rp.sort_by(f64::total_cmp);
    record("paired", r1[r1.len() / 2]);
    record("paired_par", rp[rp.len() / 2]);
    summary(pages, threads);
}

fn summary(pages: u64, threads: usize) {
    let Ok(m) = MEANS.lock() else { return };
    let best = |name: &str| {
        m.iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .fold(f64::INFINITY, f64::min)
    };
    let rate = |s: f64| pages as f64 / s / 1e6;
    let (walk, floor, floor_par) = (best("walk"), best("floor"), best("floor_par"));
    println!(
        "\n== pvfast state-only destroy walk vs the state-transition floor ({pages} pages, best sample) =="
    );
    println!(
        "walk (UV pool, {threads} threads)   {:8.1} M pages/s",
        rate(walk)
    );
    println!(
        "floor, plain CAS loop (1 thread) {:8.1} M pages/s",
        rate(floor)
    );
    println!(
        "floor, CAS loop on {threads} threads    {:8.1} M pages/s",
        rate(floor_par)
    );
    println!("ratio walk/floor (best)          {:.3}", floor / walk);
    println!("ratio walk/floor_par (best)      {:.3}", floor_par / walk);
    println!("ratio walk/floor paired          {:.3}", best("paired"));
    println!("ratio walk/floor_par paired      {:.3}", best("paired_par"));
    println!("  (paired = median of 7 back-to-back runs of each)");
}

criterion_group!(benches, bench);
criterion_main!(benches);
