//! The new architectures everywhere lethe runs a model, on the tiny random models of
//! tests/fixtures/goldens/arch/: `inspect`, `run`, ULD with a `forge assistant`, a LoRA from
//! `patch random` (read back by llama.cpp's Python reader, with phi3's fused tensors as
//! llama.cpp names them), `patch bake`, directional ablation, and `serve` answering as
//! llama.cpp does.

mod common;

use common::serve::Server;
use common::{fixture, ids, python_dump, TempDir};
use lethe::model::{Model, Proj, WeightId};
use lethe::patch::{self, LowRankEntry, PatchSet};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_lethe");
const NEW: [&str; 6] = ["qwen2", "qwen3", "phi3", "phi2", "gemma2", "olmo2"];

fn tiny(arch: &str) -> PathBuf {
    fixture(&format!("goldens/arch/{arch}.gguf"))
}

fn lethe(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run lethe");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "lethe {args:?} failed:\n{so}\n{se}");
    format!("{so}{se}")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// inspect, run, an assistant and ULD with it, a random LoRA (as llama.cpp's reader sees it)
/// and a run with it, bake, and an ablation patch, on each new architecture.
#[test]
fn every_command_runs_each_architecture() {
    let dir = TempDir::new("arch-tiny");
    for arch in NEW {
        let m = tiny(arch);
        let out = lethe(&["inspect", s(&m)]);
        assert!(
            out.contains("general.architecture") && out.contains(arch),
            "{out}"
        );
        let run = |extra: &[&str]| {
            let mut a = vec![
                "run",
                "-m",
                s(&m),
                "-p",
                "the cat",
                "-n",
                "6",
                "--temp",
                "0",
            ];
            a.extend_from_slice(&["-t", "2"]);
            a.extend_from_slice(extra);
            lethe(&a)
        };
        let plain = run(&[]);
        assert!(plain.starts_with("the cat"), "{arch}: {plain}");

        // ULD: an assistant cut from the target's first block.
        let asst = dir.join(&format!("asst-{arch}.gguf"));
        lethe(&[
            "forge",
            "assistant",
            "-m",
            s(&m),
            "--layers",
            "1",
            "-o",
            s(&asst),
        ]);
        let a = Model::open(&asst, 1).unwrap();
        assert_eq!((a.cfg.arch.name(), a.cfg.n_layer), (arch, 1));
        run(&["--assistant", s(&asst), "--alpha", "0.5"]);

        // A LoRA on every matrix of block 0, as llama.cpp would name its tensors.
        let lora = dir.join(&format!("lora-{arch}.gguf"));
        lethe(&[
            "patch",
            "random",
            "-m",
            s(&m),
            "-o",
            s(&lora),
            "--rank",
            "4",
            "--blocks",
            "0..1",
            "--std",
            "0.05",
        ]);
        let dump = python_dump(&lora);
        let names: Vec<String> = dump["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        let base = Model::open(&m, 1).unwrap();
        for name in &names {
            let t = name.rsplit_once('.').unwrap().0;
            assert!(
                base.file.tensor(t).is_some(),
                "{arch}: the LoRA names {t}, which the model's file does not have"
            );
        }
        if arch == "phi3" {
            assert!(
                names.contains(&"blk.0.attn_qkv.weight.lora_b".to_string()),
                "{names:?}"
            );
            let b = dump["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == "blk.0.attn_qkv.weight.lora_b")
                .unwrap();
            // [rank of q + k + v, 128 + 64 + 64]
            assert_eq!(b["shape"], json!([12, 256]));
        }
        let patched = run(&["--lora", s(&lora)]);
        let baked = dir.join(&format!("baked-{arch}.gguf"));
        lethe(&[
            "patch",
            "bake",
            "-m",
            s(&m),
            "--patch",
            s(&lora),
            "-o",
            s(&baked),
            "-t",
            "2",
        ]);
        let from_baked = lethe(&[
            "run",
            "-m",
            s(&baked),
            "-p",
            "the cat",
            "-n",
            "6",
            "--temp",
            "0",
            "-t",
            "2",
        ]);
        assert_eq!(
            from_baked, patched,
            "{arch}: the baked model answers as the patched one"
        );

        // Directional ablation of two texts from two others.
        let f = dir.file(
            &format!("f-{arch}.json"),
            r#"[{"text":"the cat sat"},{"text":"a dog ran"}]"#,
        );
        let r = dir.file(
            &format!("r-{arch}.json"),
            r#"[{"text":"one two three"},{"text":"red sky"}]"#,
        );
        let abl = dir.join(&format!("abl-{arch}.gguf"));
        lethe(&[
            "forge",
            "ablate",
            "-m",
            s(&m),
            "--forget",
            s(&f),
            "--retain",
            s(&r),
            "--layer",
            "2",
            "-o",
            s(&abl),
            "-t",
            "2",
        ]);
        run(&["--delta", s(&abl)]);
    }
}

/// A fused tensor's LoRA (phi3's `attn_qkv`, gate+up `ffn_up`) changes each matrix it holds
/// by that matrix's own low-rank delta: `W x + B_p A_p x` for p in q, k, v, gate, up.
#[test]
fn fused_lora_is_the_sum_of_its_parts() {
    let m = Model::open(tiny("phi3"), 1).unwrap();
    let mut rng = common::Rng(7);
    let projs = [Proj::Q, Proj::K, Proj::V, Proj::Gate, Proj::Up];
    let entries: Vec<LowRankEntry> = projs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let t = WeightId::Block(1, p);
            let (cols, rows) = m.target_shape(t).unwrap();
            let rank = 2 + i; // different ranks, so the merge has to rescale
            LowRankEntry {
                base: t.tensor_name(),
                cols,
                rows,
                rank,
                a: rng.vec(rank * cols, 0.1),
                b: rng.vec(rows * rank, 0.1),
            }
        })
        .collect();
    let alpha = Some(8.0);
    let fused = patch::to_file_tensors(&m, entries.clone(), alpha).unwrap();
    let mut names: Vec<&str> = fused.iter().map(|e| e.base.as_str()).collect();
    names.sort();
    assert_eq!(names, ["blk.1.attn_qkv.weight", "blk.1.ffn_up.weight"]);
    let dir = TempDir::new("fused-lora");
    let path = dir.join("fused.gguf");
    patch::write_lora(&path, "phi3", "fused", alpha, &fused).unwrap();
    let p = Arc::new(patch::load(&path, &m).unwrap());
    let set = PatchSet::new(&m, &[(p, 1.0)]).unwrap();
    for (e, &proj) in entries.iter().zip(&projs) {
        let t = WeightId::Block(1, proj);
        let x = rng.vec(e.cols, 1.0);
        let plain = m.apply_weight(t, &x, 1, None).unwrap();
        let got = m.apply_weight(t, &x, 1, Some(&set)).unwrap();
        let ax: Vec<f64> = (0..e.rank)
            .map(|k| {
                (0..e.cols)
                    .map(|c| e.a[k * e.cols + c] as f64 * x[c] as f64)
                    .sum()
            })
            .collect();
        let s = 8.0 / e.rank as f64;
        for r in 0..e.rows {
            let d: f64 = (0..e.rank)
                .map(|k| e.b[r * e.rank + k] as f64 * ax[k])
                .sum();
            let mag: f64 = (0..e.rank)
                .map(|k| (e.b[r * e.rank + k] as f64 * ax[k]).abs())
                .sum();
            let want = plain[r] as f64 + s * d;
            // The low-rank path meets 8-bit activations, as the fused matmuls do: its budget
            // is a share of the delta's own magnitude.
            let tol = 2e-3 * s * mag + 1e-5 * (1.0 + want.abs());
            assert!(
                (got[r] as f64 - want).abs() <= tol,
                "{} row {r}: {} vs {want}",
                t.tensor_name(),
                got[r]
            );
        }
    }
}

/// `lethe serve` on each tiny model answers a token-id prompt with llama.cpp's greedy ids up
/// to the first near-tie.
#[test]
fn serve_answers_as_llama_cpp_on_each_architecture() {
    for arch in NEW {
        let text = std::fs::read_to_string(fixture(&format!("goldens/arch/{arch}.json"))).unwrap();
        let g: serde_json::Value = serde_json::from_str(&text).unwrap();
        let p = &g["prompts"][3];
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["ids"]);
        let k = p["steps"]
            .as_array()
            .unwrap()
            .iter()
            .position(|s| {
                s["top"][0][1].as_f64().unwrap() - s["top"][1][1].as_f64().unwrap() < 0.05
            })
            .unwrap_or(want.len())
            .max(1);
        let server = Server::start(&["-m", s(&tiny(arch)), "-c", "256"]);
        let (st, v) = server.post(
            "/completion",
            &json!({"prompt": prompt, "n_predict": k, "temperature": 0, "n_probs": 1}),
        );
        assert_eq!(st, 200, "{arch}: {v}");
        let got: Vec<u32> = v["completion_probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got, want[..k.min(want.len())], "{arch}");
    }
}
