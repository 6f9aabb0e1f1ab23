//! A test seam: what state machines apply, reported to an observer on the
//! same thread. The deterministic simulation (one thread for every node)
//! installs one to check, from outside the state machine, that no group
//! ever applies a write to a slot it does not own and that no two groups
//! own a slot at once. Production never installs one; the cost is one
//! thread-local lookup per applied entry.

use std::cell::RefCell;
use std::rc::Rc;

use palisade_shard::{Slot, SlotSet};

use crate::types::GroupId;

/// Something a state machine applied at `index` of `group`.
#[derive(Debug, Clone)]
pub struct ApplyEvent {
    pub group: GroupId,
    pub index: u64,
    pub what: Applied,
}

#[derive(Debug, Clone)]
pub enum Applied {
    /// A client write touching these slots was applied (not refused).
    Write { slots: Vec<Slot> },
    /// The group's slot ownership after a slot command.
    Ownership { owned: SlotSet, frozen: SlotSet },
}

type Observer = Rc<dyn Fn(ApplyEvent)>;

thread_local! {
    static OBSERVER: RefCell<Option<Observer>> = const { RefCell::new(None) };
}

/// Installs `f` as this thread's observer (until [`clear_observer`]).
pub fn set_observer(f: impl Fn(ApplyEvent) + 'static) {
    OBSERVER.with(|o| *o.borrow_mut() = Some(Rc::new(f)));
}

/// Removes this thread's observer.
pub fn clear_observer() {
    OBSERVER.with(|o| *o.borrow_mut() = None);
}

/// Reports `event` to this thread's observer, if there is one.
pub(crate) fn report(event: impl FnOnce() -> ApplyEvent) {
    let observer = OBSERVER.with(|o| o.borrow().clone());
    if let Some(f) = observer {
        f(event());
    }
}
