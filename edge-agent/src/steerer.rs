//! The data plane's steering state, shared by the run loop and the probing thread (I/O: it
//! writes the eBPF maps).
//!
//! The run loop brings new intents and, once loaded and attached, the data plane; the probing
//! thread brings path views (health, hold-down, SLA standing). Whoever learns something
//! re-plans ([`crate::steering::plan`], pure) and writes the changed map entries at once under
//! the lock, so a failover never waits for the run loop, which can be busy for a while with
//! `ip` commands while it applies an intent. Planning and writing a handful of entries take
//! microseconds; nothing slow (walking the flow table, netlink) happens under the lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use patronus_proto::events::SdwanEvent;
use patronus_proto::{PathId, SiteIntent};

use crate::classifier::Compiled;
use crate::dataplane::{Dataplane, FlowTable};
use crate::steering::{PathView, SiteSlots, SteeringPlan};

#[derive(Default)]
pub struct Steerer {
    dataplane: Option<Box<Dataplane>>,
    intent: Option<SiteIntent>,
    /// The applied intent's policies, compiled once per intent (not per failover).
    wanted: Option<Compiled>,
    /// The policies last written (names for flow reports).
    compiled: Option<Compiled>,
    slots: SiteSlots,
    views: BTreeMap<PathId, PathView>,
    last_plan: Option<SteeringPlan>,
    /// Failovers found while writing, for the run loop to report.
    events: Vec<SdwanEvent>,
}

/// The steerer as both threads hold it.
#[derive(Clone, Default)]
pub struct SharedSteerer(Arc<Mutex<Steerer>>);

impl SharedSteerer {
    /// The state; a thread that panicked while holding it left nothing half-written that
    /// re-planning would not repair, so a poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, Steerer> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Steerer {
    /// The data plane is loaded and attached: steer with it from now on. Returns a handle
    /// on its flow table for the flow reports.
    pub fn attach(&mut self, dataplane: Box<Dataplane>) -> Option<FlowTable> {
        let table = match dataplane.flow_table() {
            Ok(table) => Some(table),
            Err(e) => {
                eprintln!("dataplane: no flow reports ({e})");
                None
            }
        };
        self.dataplane = Some(dataplane);
        self.last_plan = None;
        self.steer();
        table
    }

    pub fn set_intent(&mut self, intent: SiteIntent) {
        self.slots.update(intent.peers.iter().map(|p| p.site));
        match crate::classifier::compile(&intent.policies.routing) {
            Ok(compiled) => self.wanted = Some(compiled),
            Err(e) => eprintln!("dataplane: {e}; the previous policies stay in force"),
        }
        self.intent = Some(intent);
        self.steer();
    }

    pub fn set_views(&mut self, views: BTreeMap<PathId, PathView>) {
        self.views = views;
        self.steer();
    }

    pub fn compiled(&self) -> Option<&Compiled> {
        self.compiled.as_ref()
    }

    pub fn take_events(&mut self) -> Vec<SdwanEvent> {
        std::mem::take(&mut self.events)
    }

    /// Plan from what is known and write what changed.
    fn steer(&mut self) {
        let (Some(intent), Some(compiled), Some(dp)) =
            (&self.intent, &self.wanted, &mut self.dataplane)
        else {
            return;
        };
        let plan = crate::steering::plan(intent, compiled, &self.slots, &self.views);
        if self.last_plan.as_ref() == Some(&plan) && self.compiled.as_ref() == Some(compiled) {
            return;
        }
        match dp.apply(compiled, &plan) {
            Ok(writes) => {
                eprintln!(
                    "dataplane: {} policies in {} classes over {} paths ({writes} map writes)",
                    compiled.rules.len(),
                    compiled.classes.len(),
                    plan.paths.len()
                );
                if let Some(before) = &self.last_plan {
                    for (from, to, reason) in
                        crate::steering::failovers(intent, &self.slots, before, &plan, &self.views)
                    {
                        eprintln!("dataplane: failover {from} -> {to}: {reason}");
                        self.events.push(SdwanEvent::FailoverTriggered {
                            from_path: from,
                            to_path: to,
                            reason,
                        });
                    }
                }
                self.last_plan = Some(plan);
                self.compiled = Some(compiled.clone());
            }
            // The next change retries everything (last_plan is unchanged).
            Err(e) => eprintln!("dataplane: writing the maps failed: {e}"),
        }
    }
}
