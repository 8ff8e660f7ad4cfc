//! How the demo speaks: numbered scenes with a heading, the commands and
//! evidence they produced, a progress indicator while they wait, and one
//! line per assertion (✓ held, ✗ did not). Failures are counted; the demo
//! exits non-zero when any assertion failed.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Most lines of evidence shown for one output.
const EVIDENCE_LINES: usize = 14;

/// The demo's voice.
pub struct Show {
    tty: bool,
    scene: usize,
    /// Assertions that did not hold, as `scene. claim`.
    pub failures: Vec<String>,
    /// Assertions that held.
    pub held: usize,
}

impl Default for Show {
    fn default() -> Self {
        Show { tty: std::io::stdout().is_terminal(), scene: 0, failures: Vec::new(), held: 0 }
    }
}

impl Show {
    /// A scene's heading.
    pub fn scene(&mut self, title: &str) {
        self.scene += 1;
        println!("\n{}. {title}", self.scene);
    }

    /// A scene that cannot be played yet, and why.
    pub fn not_yet(&mut self, title: &str, why: &str) {
        self.scene += 1;
        println!("\n{}. {title} — not yet", self.scene);
        self.say(why);
    }

    /// A line of narration.
    pub fn say(&self, text: &str) {
        for line in text.lines() {
            println!("   {line}");
        }
    }

    /// A command, as an auditor or operator would type it.
    pub fn command(&self, text: &str) {
        println!("   $ {text}");
    }

    /// Output that is evidence, trimmed to a screenful.
    pub fn evidence(&self, text: &str) {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        for line in lines.iter().take(EVIDENCE_LINES) {
            println!("   │ {line}");
        }
        if lines.len() > EVIDENCE_LINES {
            println!("   │ … {} more lines", lines.len() - EVIDENCE_LINES);
        }
    }

    /// An assertion: printed, and counted when it fails.
    pub fn check(&mut self, held: bool, claim: &str) -> bool {
        if held {
            self.held += 1;
            println!("   ✓ {claim}");
        } else {
            self.failures.push(format!("{}. {claim}", self.scene));
            println!("   ✗ {claim}");
        }
        held
    }

    /// A scene that could not be played to its end.
    pub fn broken(&mut self, error: &anyhow::Error) {
        self.failures.push(format!("{}. {error:#}", self.scene));
        println!("   ✗ {error:#}");
    }

    /// Awaits `work`, showing what is awaited (a spinner on a terminal).
    pub async fn waiting<T>(&self, what: &str, work: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        if !self.tty {
            return work.await;
        }
        let mut work = std::pin::pin!(work);
        let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut frame = 0;
        let out = loop {
            tokio::select! {
                out = &mut work => break out,
                _ = tick.tick() => {
                    print!("\r   {} {what} ({:.1} s)", frames[frame % frames.len()], started.elapsed().as_secs_f32());
                    let _ = std::io::stdout().flush();
                    frame += 1;
                }
            }
        };
        print!("\r\x1b[2K");
        let _ = std::io::stdout().flush();
        out
    }
}
