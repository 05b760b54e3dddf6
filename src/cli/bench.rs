//! `lethe bench`: prefill and decode speed measured as llama-bench measures them (a 128-token
//! prompt, 128 decoded tokens, median of repetitions), the machine's memory read bandwidth
//! measured in the same run, and decode as a fraction of the bandwidth ceiling.

use super::common::ModelArgs;
use anyhow::Result;
use clap::Args;
use lethe::generate::Decoder;
use lethe::model::Model;
use lethe::pool::ThreadPool;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prefill test.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    pub n_prompt: usize,
    /// Generated tokens for the decode test.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions; the median is reported.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also decode this many sequences together (one batched forward per step, as the
    /// server's busy slots do) and report their total tokens/s beside one sequence's,
    /// the two runs alternating.
    #[arg(long = "parallel", default_value_t = 1)]
    pub parallel: usize,
}

/// Total decode tokens/s of `n_seq` sequences decoded together for `n_gen` steps, each from
/// its own one-token prompt (greedy), through [`Model::forward_multi`].
/// Decode tokens/s of `n_seq` sequences stepped together through
/// [`lethe::generate::feed_each`] (one batched forward per model per step; a ULD profile's
/// lockstep decoders step together too), each decoder made by `make`; each token the greedy
/// choice of the last.
pub fn decoders_tps(
    make: &dyn Fn(usize) -> Result<Box<dyn Decoder>>,
    n_seq: usize,
    n_gen: usize,
) -> Result<f64> {
    let n_ctx = (n_gen + 8).next_multiple_of(256);
    let mut decs = (0..n_seq)
        .map(|_| make(n_ctx))
        .collect::<Result<Vec<_>>>()?;
    let vocab = decs.first().map_or(1, |d| d.n_vocab()) as u32;
    let mut next: Vec<u32> = (0..n_seq as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let t = Instant::now();
    for _ in 0..n_gen {
        let mut refs: Vec<&mut dyn Decoder> = Vec::with_capacity(decs.len());
        for d in decs.iter_mut() {
            refs.push(d.as_mut());
        }
        let mut err = None;
        lethe::generate::feed_each(&mut refs, &next.clone(), |i, r| match r {
            Ok(l) => next[i] = lethe::generate::sampler::argmax_raw(l),
            Err(e) => err = Some(e),
        });
        if let Some(e) = err {
            return Err(e.into());
        }
    }
    Ok((n_seq * n_gen) as f64 / t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Read bandwidth in bytes/s: the best of several passes summing a buffer far larger than the
/// caches, on all of the pool's threads.
pub fn measure_bandwidth(pool: &ThreadPool) -> f64 {
    const BYTES: usize = 512 << 20;
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = 0.0f64;
    // A shared machine's bandwidth varies from second to second: passes spread over about a
    // second, and the best one is the ceiling (the conservative choice for the fraction).
    for pass in 0..12 {
        if pass % 3 == 0 && pass > 0 {
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
        let t = Instant::now();
        pool.run(&|ith, nth| {
            let r = ThreadPool::split(buf.len() / 64, ith, nth);
            let chunk = &buf[r.start * 64..r.end * 64];
            let mut acc = [0u64; 8];
            for c in chunk.chunks_exact(8) {
                for k in 0..8 {
                    acc[k] ^= c[k];
                }
            }
            sink.fetch_xor(
                acc.iter().fold(0, |a, b| a ^ b),
                std::sync::atomic::Ordering::Relaxed,
            );
        });
        best = best.max(BYTES as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink.into_inner());
    best
}

pub struct BenchResult {
    pub pp_tps: f64,
    pub tg_tps: f64,
    pub bandwidth: f64,
    pub bytes_per_token: usize,
    pub n_ctx: usize,
    pub peak_rss_mib: Option<f64>,
}

pub fn run_bench(model: &Model, n_prompt: usize, n_gen: usize, reps: usize) -> Result<BenchResult> {
    let n_ctx = (n_prompt + n_gen + 8).next_multiple_of(256);
    let mut st = model.new_state(n_ctx);
    let vocab = model.cfg.n_vocab as u32;
    // Arbitrary but fixed tokens, as llama-bench uses random ones.
    let prompt: Vec<u32> = (0..n_prompt as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    // Warm-up: touch every weight once.
    model.forward(&mut st, &prompt[..prompt.len().min(16)], None)?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        st.reset();
        let t = Instant::now();
        model.forward(&mut st, &prompt, None)?;
        pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());

        st.reset();
        let t = Instant::now();
        let mut next = prompt[0];
        for _ in 0..n_gen {
            let logits = model.forward(&mut st, &[next], None)?;
            next = lethe::generate::sampler::argmax_raw(logits);
        }
        tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
    }
    // Peak RSS of the model run itself, before the bandwidth test's buffer exists.
    let peak_rss_mib = peak_rss_mib();
    let bandwidth = measure_bandwidth(&model.pool);
    Ok(BenchResult {
        pp_tps: median(pp),
        tg_tps: median(tg),
        bandwidth,
        bytes_per_token: model.bytes_per_token(),
        n_ctx,
        peak_rss_mib,
    })
}

/// Decode speed of two decoders measured side by side: each step of one is followed by a step
/// of the other, so both see the same state of a shared machine. Returns the tokens/s of each
/// over `n_gen` steps after a short prompt.
pub fn paired_decode_tps(
    a: &mut dyn Decoder,
    b: &mut dyn Decoder,
    vocab: u32,
    n_gen: usize,
) -> Result<(f64, f64)> {
    fn step(d: &mut dyn Decoder, tok: u32, secs: &mut f64) -> Result<u32> {
        let t = Instant::now();
        let logits = d.feed(&[tok])?;
        *secs += t.elapsed().as_secs_f64();
        Ok(lethe::generate::sampler::argmax_raw(logits))
    }
    let mut secs = [0.0f64; 2];
    a.truncate(0);
    b.truncate(0);
    let mut na = lethe::generate::sampler::argmax_raw(a.feed(&[1 % vocab])?);
    let mut nb = lethe::generate::sampler::argmax_raw(b.feed(&[1 % vocab])?);
    for _ in 0..n_gen {
        na = step(a, na, &mut secs[0])?;
        nb = step(b, nb, &mut secs[1])?;
    }
    Ok((n_gen as f64 / secs[0], n_gen as f64 / secs[1]))
}

pub fn main(a: BenchArgs) -> Result<()> {
    let l = a.model.load()?;
    let m = &l.base.model;
    if a.parallel > 1 {
        // One sequence and `parallel` together, alternating, so that both see the same
        // machine; with a profile (or patches), its decoders.
        let make = |n_ctx: usize| l.decoder(n_ctx);
        let (mut one, mut many) = (Vec::new(), Vec::new());
        decoders_tps(&make, 1, 8)?;
        for _ in 0..a.reps.max(1) {
            one.push(decoders_tps(&make, 1, a.n_gen)?);
            many.push(decoders_tps(&make, a.parallel, a.n_gen)?);
        }
        let (one, many) = (median(one), median(many));
        let what = match (&l.forgotten.profile, l.forgotten.is_plain()) {
            (Some(p), _) => format!(" (profile {p:?})"),
            (None, false) => " (with its assistants and patches)".into(),
            (None, true) => String::new(),
        };
        println!(
            "decode tg{}{what}: 1 sequence {one:.1} tok/s, {} together {many:.1} tok/s in total \
             ({:.2}x; median of {} runs alternating, {} threads)",
            a.n_gen,
            a.parallel,
            many / one,
            a.reps.max(1),
            m.pool.n_threads()
        );
        return Ok(());
    }
    if !l.forgotten.is_plain() || !a.model.patches.is_empty() {
        // Unlearning overhead: the base model and the model with its assistants and patches,
        // alternating, in the same run.
        let n_ctx = (a.n_gen + 16).next_multiple_of(256);
        let vocab = m.cfg.n_vocab as u32;
        let mut base = lethe::generate::ModelDecoder::new(m.clone(), n_ctx);
        let mut uld = l.decoder(n_ctx)?;
        let (mut b, mut u) = (Vec::new(), Vec::new());
        for _ in 0..a.reps.max(1) {
            let (tb, tu) = paired_decode_tps(&mut base, uld.as_mut(), vocab, a.n_gen)?;
            b.push(tb);
            u.push(tu);
        }
        let (b, u) = (median(b), median(u));
        let mut terms: Vec<String> = l
            .forgotten
            .terms
            .iter()
            .map(|t| {
                let shared = m.shared_blocks(&t.model).map_or(0, |s| s.k());
                format!(
                    "{:?} w={} r={} ({} blocks, the first {shared} the base's own)",
                    t.kind, t.weight, t.filter, t.model.cfg.n_layer
                )
            })
            .collect();
        let parts = l
            .forgotten
            .patches
            .as_ref()
            .map_or(&[][..], |p| &p.parts[..]);
        for (p, s) in parts {
            let file = std::path::Path::new(&p.source);
            let name = file
                .file_name()
                .map_or(p.source.clone(), |f| f.to_string_lossy().into_owned());
            terms.push(format!("{} {name} x{s}", p.kind.name()));
        }
        if parts.is_empty() && l.forgotten.terms.is_empty() {
            terms.push("patches at scale 0: nothing applied".into());
        }
        let what = match (&l.forgotten.profile, l.forgotten.terms.is_empty()) {
            (Some(p), _) => format!("profile {p:?}"),
            (None, false) => "with ULD".into(),
            (None, true) => "patched".into(),
        };
        println!(
            "decode tg{}: base {b:.1} tok/s, {what} {u:.1} tok/s: {:.1}% of base (median of {} \
             runs, the two decoders stepping in turn) [{}]",
            a.n_gen,
            100.0 * u / b,
            a.reps.max(1),
            terms.join("; ")
        );
        return Ok(());
    }
    let r = run_bench(m, a.n_prompt, a.n_gen, a.reps.max(1))?;
    let ceiling = r.bandwidth / r.bytes_per_token as f64;
    let name = l
        .base
        .path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let threads = m.pool.n_threads();
    let isa = format!("{:?}", lethe_kernels::cpu::isa());
    // Spells the pool ran on its caller alone because pre-empted workers stalled it (a busy
    // host): figures from such a run are not the machine's two-thread speed.
    let solo_spells = m.pool.solo_spells();
    if a.json {
        let j = serde_json::json!({
            "model": name, "threads": threads, "isa": isa,
            "pp": a.n_prompt, "tg": a.n_gen, "reps": a.reps,
            "prefill_tps": r.pp_tps, "decode_tps": r.tg_tps,
            "bandwidth_gbs": r.bandwidth / 1e9, "bytes_per_token": r.bytes_per_token,
            "ceiling_tps": ceiling, "fraction_of_ceiling": r.tg_tps / ceiling,
            "n_ctx": r.n_ctx, "peak_rss_mib": r.peak_rss_mib, "solo_spells": solo_spells,
        });
        println!("{j}");
        return Ok(());
    }
    println!(
        "model: {name}  threads: {threads}  isa: {isa}  reps: {} (median)",
        a.reps
    );
    println!("| test   |      tok/s |");
    println!("| pp{:<4} | {:>10.1} |", a.n_prompt, r.pp_tps);
    println!("| tg{:<4} | {:>10.1} |", a.n_gen, r.tg_tps);
    println!(
        "memory read bandwidth {:.1} GB/s; {:.1} MB read per token; ceiling {:.1} tok/s; decode at {:.0}% of the ceiling",
        r.bandwidth / 1e9,
        r.bytes_per_token as f64 / 1e6,
        ceiling,
        100.0 * r.tg_tps / ceiling
    );
    if let Some(rss) = r.peak_rss_mib {
        println!(
            "peak RSS {rss:.1} MiB (context {} tokens; before the bandwidth test)",
            r.n_ctx
        );
    }
    if solo_spells > 0 {
        println!(
            "pool: {solo_spells} solo spell(s): workers were pre-empted (a busy host), so parts \
             of this run used one thread"
        );
    }
    Ok(())
}

/// Peak resident set size of this process (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
