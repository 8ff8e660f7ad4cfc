//! Running code that may panic on hostile input (the CEL interpreter over
//! a rule and a caller's arguments) without crashing the process and
//! without its panic message reaching the log: a message can quote the
//! value being evaluated, and that value may be PHI.
//!
//! A panic inside [`contained`] is caught; the process's panic hook is
//! wrapped once so that, on the thread running contained code, it prints
//! one fixed line instead of the message. Panics anywhere else reach the
//! previous hook unchanged.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static CONTAINING: Cell<bool> = const { Cell::new(false) };
}

static WRAP_HOOK: Once = Once::new();
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Panics contained so far in this process (the fuzz harness checks that
/// none happened: a contained panic is still a defect to find).
pub fn panics_contained() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// What a contained panic leaves: nothing of its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

/// Runs `f`; a panic in it is `Err(Panicked)`, and its message is not printed.
pub fn contained<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINING.with(Cell::get) {
                PANICS.fetch_add(1, Ordering::Relaxed);
                eprintln!("a rule evaluation panicked and was contained (its message is withheld)");
            } else {
                previous(info);
            }
        }));
    });
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(outer));
    result.map_err(|_| Panicked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_an_error_and_the_thread_goes_on() {
        assert_eq!(contained(|| 7), Ok(7));
        let secret = String::from("123-45-6789");
        let before = panics_contained();
        assert!(contained(|| panic!("value {secret}")).is_err());
        assert!(panics_contained() > before);
        assert!(!CONTAINING.with(Cell::get), "the flag outlived the call");
        assert_eq!(contained(|| contained(|| 1).unwrap() + 1), Ok(2));
    }

    /// Runs in a child process (this test binary again) so that its stderr
    /// is what the default hook would have printed.
    #[test]
    fn the_message_of_a_contained_panic_is_not_printed() {
        const CHILD: &str = "MCPW_CONTAINED_PANIC_CHILD";
        let name = "policy::contained::tests::the_message_of_a_contained_panic_is_not_printed";
        if std::env::var_os(CHILD).is_some() {
            let secret = String::from("123-45-6789");
            assert!(contained(|| panic!("value {secret}")).is_err());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the child failed: {stderr}");
        assert!(stderr.contains("was contained"), "no contained line: {stderr}");
        assert!(!stderr.contains("123-45-6789"), "the panic's message was printed: {stderr}");
    }
}
