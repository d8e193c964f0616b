//! Run options for requests that name a subset of a model's outputs. Clients ask for the same few
//! subsets again and again, so each is built once and kept; the number kept is bounded (a client
//! cycling through many lists gets options built for its run instead, never unbounded memory).
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions};

use crate::scheduler::ExecuteError;

/// How many distinct output lists one executor keeps options for.
pub const MAX_KEPT_SUBSETS: usize = 16;

type SubsetOptions = RunOptions<HasSelectedOutputs>;

#[derive(Default)]
pub struct OutputSubsets {
    kept: Vec<(Vec<String>, SubsetOptions)>,
}

impl OutputSubsets {
    /// The kept options for exactly this list of names (same names, same order).
    pub fn get(&self, names: &[String]) -> Option<&SubsetOptions> {
        self.kept
            .iter()
            .find(|(kept, _)| kept.as_slice() == names)
            .map(|(_, options)| options)
    }

    /// Options that select `names`, in that order.
    pub fn options_for(names: &[String]) -> Result<SubsetOptions, ExecuteError> {
        let selector = names.iter().fold(OutputSelector::no_default(), |s, name| {
            s.with(name.as_str())
        });
        RunOptions::new()
            .map(|options| options.with_outputs(selector))
            .map_err(|e| ExecuteError(e.to_string()))
    }

    /// Keeps `options` for `names` while there is room.
    pub fn keep(&mut self, names: &[String], options: SubsetOptions) {
        if self.kept.len() < MAX_KEPT_SUBSETS && self.get(names).is_none() {
            self.kept.push((names.to_vec(), options));
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.kept.len()
    }
}
