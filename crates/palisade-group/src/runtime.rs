//! The async runtime openraft runs on: tokio, with one difference — the
//! random numbers behind election timeouts can come from a seed.
//!
//! In production no seed is set and every call draws from the OS. A
//! deterministic simulation calls [`seed_thread_rng`] before starting its
//! hosts: every later draw on that thread then comes from a counter-mixed
//! seeded generator, so the same seed replays the same elections.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::{AsyncRuntime, TokioOneShotSender};
use openraft::{OptionalSend, TokioInstant};
use rand::SeedableRng;
use rand::rngs::StdRng;

thread_local! {
    /// (seed, draws so far) when this thread was seeded.
    static SEED: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Makes every later `thread_rng()` on this thread deterministic.
pub fn seed_thread_rng(seed: u64) {
    SEED.with(|s| s.set(Some((seed, 0))));
}

/// Returns this thread to OS randomness.
pub fn unseed_thread_rng() {
    SEED.with(|s| s.set(None));
}

/// tokio, with seedable randomness. See the module doc.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PalisadeRuntime;

impl AsyncRuntime for PalisadeRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = StdRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        SEED.with(|s| match s.get() {
            Some((seed, draws)) => {
                s.set(Some((seed, draws + 1)));
                // SplitMix-style mixing so consecutive draws are unrelated.
                StdRng::seed_from_u64(seed ^ draws.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            }
            None => StdRng::from_entropy(),
        })
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    fn draws() -> Vec<u64> {
        (0..5)
            .map(|_| PalisadeRuntime::thread_rng().r#gen())
            .collect()
    }

    #[test]
    fn a_seed_replays_the_same_draws() {
        seed_thread_rng(7);
        let a = draws();
        seed_thread_rng(7);
        let b = draws();
        seed_thread_rng(8);
        let c = draws();
        unseed_thread_rng();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(
            a.windows(2).all(|w| w[0] != w[1]),
            "consecutive draws must differ"
        );
    }
}
