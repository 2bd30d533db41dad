//! Long generations that are stopped from outside: Ctrl-C (SIGINT) keeps the text generated so
//! far and exits with 130; a model file written to while it is mapped stops the run with one
//! clear line. Unix only (signals, `kill`).
#![cfg(unix)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use freekv_model::testing::{TinyConfig, tiny_random_model_bytes};

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny model with a context long enough that `-n 60000` runs for minutes.
fn setup(name: &str) -> (Tmp, PathBuf) {
    let dir = std::env::temp_dir().join(format!("freekv-cli-int-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = TinyConfig {
        n_layers: 2,
        context_length: 1 << 16,
        ..TinyConfig::default()
    };
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, tiny_random_model_bytes(11, &cfg).unwrap()).unwrap();
    (Tmp(dir), model)
}

/// A running `freekv generate` whose stdout is collected by a thread.
struct Run {
    child: Child,
    chunks: mpsc::Receiver<Vec<u8>>,
    stdout: Vec<u8>,
}

impl Run {
    fn start(model: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_freekv"))
            .args([
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--device",
                "cpu",
                "-n",
                "60000",
                "--ignore-eos",
                "--temperature",
                "1",
                "--seed",
                "3",
                "the cat and the hat",
            ])
            .env_remove("FREEKV_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            chunks,
            stdout: Vec::new(),
        }
    }

    /// Waits until the run has printed at least `bytes` bytes of text.
    fn wait_for_output(&mut self, bytes: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.stdout.len() < bytes {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(c) => self.stdout.extend(c),
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("no output from freekv generate: {e}");
                }
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the exit (killing the run after a minute) and returns (exit code, stdout,
    /// stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("freekv generate did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(c) = self.chunks.recv_timeout(Duration::from_secs(5)) {
            self.stdout.extend(c);
        }
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (
            status.code(),
            String::from_utf8_lossy(&self.stdout).into_owned(),
            err,
        )
    }
}

#[test]
fn ctrl_c_stops_cleanly_with_the_text_so_far() {
    let (_t, model) = setup("sigint");
    let mut run = Run::start(&model);
    run.wait_for_output(64);
    run.signal("-INT");
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(130), "stderr: {err}");
    assert!(out.len() >= 64 && out.ends_with('\n'), "stdout: {out:?}");
    assert!(err.contains("stop: cancelled"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    // The timing line counts the tokens that were printed: far fewer than asked.
    let decoded: usize = err
        .split("decode ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no decode count in {err}"));
    assert!(decoded > 0 && decoded < 59_999, "{decoded}");
}

#[test]
fn a_model_file_written_during_generation_stops_it_with_one_line() {
    let (_t, model) = setup("changed");
    let mut run = Run::start(&model);
    run.wait_for_output(16);
    // Appending keeps every mapped page valid (truncating would raise SIGBUS): the guard
    // sees the size change at the next decode step.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&model)
        .unwrap();
    f.write_all(&[0u8; 64]).unwrap();
    f.sync_all().unwrap();
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr: {err}");
    assert!(
        lines[0].contains("the model file changed on disk while in use")
            && lines[0].contains("its size went from"),
        "{}",
        lines[0]
    );
    assert!(out.len() >= 16 && out.ends_with('\n'), "stdout: {out:?}");
}
