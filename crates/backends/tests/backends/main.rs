//! The backends' behaviour suites, one test binary (one link of the whole crate instead of one
//! per suite): the queue contract, the catalogue, the invocation log and the object store with
//! its change feed, each against every backend its service variables name.

mod catalogue;
mod invocation_log;
mod objects;
mod queue;
mod support;
