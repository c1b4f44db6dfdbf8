//! The ledger's nodes: states in a vector indexed through a small name → slot map, with the
//! few numbers a filter's fast path reads ("hot" data) packed apart, so checking 5,000 nodes
//! touches little memory.

use std::time::SystemTime;

use super::NodeState;
use super::hash::FastMap;
use crate::units::VramUnit;

/// What [`Ledger::check`](super::Ledger::check) needs to pass a node without looking further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hot {
    /// The node's unit, when it has a valid reading.
    pub unit: Option<VramUnit>,
    /// When its reading was taken.
    pub observed_at: SystemTime,
    /// Largest effective free among its healthy GPUs.
    pub best_free: u64,
}

const COLD: Hot = Hot {
    unit: None,
    observed_at: SystemTime::UNIX_EPOCH,
    best_free: 0,
};

#[derive(Debug, Clone, Default)]
pub(super) struct NodeTable {
    ids: FastMap<usize>,
    states: Vec<NodeState>,
    hot: Vec<Hot>,
    free: Vec<usize>,
}

impl NodeTable {
    pub fn get(&self, node: &str) -> Option<&NodeState> {
        self.ids.get(node).map(|id| &self.states[*id])
    }

    pub fn get_mut(&mut self, node: &str) -> Option<&mut NodeState> {
        self.ids.get(node).map(|id| &mut self.states[*id])
    }

    pub fn hot_and_state(&self, node: &str) -> Option<(&Hot, &NodeState)> {
        self.ids
            .get(node)
            .map(|id| (&self.hot[*id], &self.states[*id]))
    }

    pub fn set_hot(&mut self, node: &str, hot: Hot) {
        if let Some(id) = self.ids.get(node) {
            self.hot[*id] = hot;
        }
    }

    /// The node's state, created empty when new.
    pub fn entry(&mut self, node: &str) -> &mut NodeState {
        let id = match self.ids.get(node) {
            Some(id) => *id,
            None => {
                let id = match self.free.pop() {
                    Some(id) => id,
                    None => {
                        self.states.push(NodeState::new());
                        self.hot.push(COLD);
                        self.states.len() - 1
                    }
                };
                self.ids.insert(node.to_string(), id);
                id
            }
        };
        &mut self.states[id]
    }

    pub fn remove(&mut self, node: &str) {
        if let Some(id) = self.ids.remove(node) {
            self.states[id] = NodeState::new();
            self.hot[id] = COLD;
            self.free.push(id);
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.ids.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &NodeState> {
        self.ids.values().map(|id| &self.states[*id])
    }
}
