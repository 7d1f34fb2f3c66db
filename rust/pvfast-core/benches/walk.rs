//! The destroy walk against the memory-bandwidth floor: walk over N GiB of secure, touched
//! pages (PVFAST_BENCH_GIB, default 2) beside memset and streaming-store zeroing of the same
//! size, plus the walk over an empty 1 TiB region. Prints walk/nt and walk/memset at the end.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvfast_core::{Ultravisor, UvOptions, PAGE_SIZE};
use rayon::prelude::*;

fn gib() -> u64 {
    std::env::var("PVFAST_BENCH_GIB").ok().and_then(|s| s.parse().ok()).filter(|&g| g > 0).unwrap_or(2)
}

/// Mean seconds per iteration of each group, for the summary.
static MEANS: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

fn record(name: &'static str, total: Duration, iters: u64) {
    if let Ok(mut m) = MEANS.lock() {
        m.push((name, total.as_secs_f64() / iters as f64));
    }
}

/// A touched, page-aligned anonymous buffer for the baselines.
struct Buf {
    ptr: *mut u8,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        // SAFETY: fresh anonymous mapping, checked against MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap of {len} bytes failed");
        let ptr = ptr.cast::<u8>();
        // SAFETY: the mapping is len bytes long and exclusively ours.
        unsafe { std::ptr::write_bytes(ptr, 1, len) };
        Buf { ptr, len }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in new().
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn bench(c: &mut Criterion) {
    let gib = gib();
    let bytes = gib << 30;
    let pages = bytes / PAGE_SIZE as u64;

    let uv = Ultravisor::new(UvOptions::default()).expect("ultravisor");
    let region = uv.create_region(bytes).expect("region");
    region.touch(0, bytes).expect("touch");
    let info = uv.info();
    let (st, handle) = uv
        .create_config(&region, bytes, 0x1000, 0, info.guest_base_stor_len, info.var_stor_len(bytes))
        .expect("create_config");
    assert!(st.is_ok());
    let resecure = || {
        let r = uv.import_range(handle, &region, 0, pages, false).expect("import_range");
        assert_eq!(r.failed_pages, 0);
    };

    let mut g = c.benchmark_group("zeroing");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Bytes(bytes));

    g.bench_function(format!("destroy_walk_{gib}GiB"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                resecure();
                let t = Instant::now();
                let w = uv.destroy_walk(&region, 0, None, None).expect("walk");
                total += t.elapsed();
                assert_eq!(w.destroyed, pages);
            }
            record("walk", total, iters);
            total
        })
    });

    let buf = Buf::new(bytes as usize);
    g.bench_function(format!("memset_{gib}GiB"), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                // SAFETY: buf is bytes long and exclusively ours.
                unsafe { std::ptr::write_bytes(black_box(buf.ptr), 0, buf.len) };
            }
            let total = t.elapsed();
            record("memset", total, iters);
            total
        })
    });
    g.bench_function(format!("nt_zero_{gib}GiB"), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                // SAFETY: as above; page aligned (mmap).
                unsafe { pvfast_core::zero::zero_nt(black_box(buf.ptr), buf.len) };
            }
            let total = t.elapsed();
            record("nt", total, iters);
            total
        })
    });
    g.bench_function(format!("nt_zero_parallel_{gib}GiB"), |b| {
        let addr = buf.ptr as usize;
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                (0..buf.len / (2 << 20)).into_par_iter().for_each(|i| {
                    // SAFETY: disjoint 2 MiB pieces of the buffer, one per task.
                    unsafe { pvfast_core::zero::zero_nt((addr + (i << 21)) as *mut u8, 2 << 20) };
                });
            }
            let total = t.elapsed();
            record("nt_par", total, iters);
            total
        })
    });
    g.finish();

    // Paired runs: each walk immediately followed by NT zeroing of the same size, so noise
    // from other load on the machine hits both sides of each ratio alike.
    let mut ratios = Vec::new();
    for _ in 0..7 {
        resecure();
        let t = Instant::now();
        uv.destroy_walk(&region, 0, None, None).expect("walk");
        let walk = t.elapsed().as_secs_f64();
        let t = Instant::now();
        // SAFETY: buf is bytes long, page aligned and exclusively ours.
        unsafe { pvfast_core::zero::zero_nt(black_box(buf.ptr), buf.len) };
        let nt = t.elapsed().as_secs_f64();
        ratios.push(nt / walk);
    }
    ratios.sort_by(f64::total_cmp);
    if let Ok(mut m) = MEANS.lock() {
        m.push(("paired_median", ratios[ratios.len() / 2]));
    }
    drop(buf);

    let mut g = c.benchmark_group("empty");
    g.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(2));
    let tib = uv.create_region(1 << 40).expect("1 TiB region");
    g.bench_function("destroy_walk_empty_1TiB", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(uv.destroy_walk(&tib, 0, None, None).expect("walk"));
            }
            let total = t.elapsed();
            record("empty_1tib", total, iters);
            total
        })
    });
    g.finish();

    summary(bytes);
}

fn summary(bytes: u64) {
    let Ok(m) = MEANS.lock() else { return };
    let best = |name: &str| {
        m.iter().filter(|(n, _)| *n == name).map(|(_, s)| *s).fold(f64::INFINITY, f64::min)
    };
    let (walk, memset, nt, nt_par, empty) = (best("walk"), best("memset"), best("nt"), best("nt_par"), best("empty_1tib"));
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!("\n== pvfast destroy walk vs zeroing floor ({} GiB, best iteration of each) ==", bytes >> 30);
    println!("walk           {:8.2} GB/s", gbs(walk));
    println!("memset         {:8.2} GB/s", gbs(memset));
    println!("nt zero        {:8.2} GB/s (1 thread)", gbs(nt));
    println!("nt zero par    {:8.2} GB/s (rayon)", gbs(nt_par));
    println!("ratio walk/nt        {:.3}", nt / walk);
    println!("ratio walk/nt_par    {:.3}", nt_par / walk);
    println!("ratio walk/memset    {:.3}", memset / walk);
    println!("ratio walk/nt paired {:.3} (median of 7 back-to-back pairs)", best("paired_median"));
    println!("empty 1 TiB walk     {:.3} ms", empty * 1e3);
}

criterion_group!(benches, bench);
criterion_main!(benches);
