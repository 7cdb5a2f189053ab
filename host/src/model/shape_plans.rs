//! Plans specialised to one concrete input shape.
//!
//! A model with dynamic dimensions (batch size, sequence length) runs
//! through a general plan whose matrix kernels tract chose without knowing
//! those sizes. Once they are fixed it picks kernels that fit them and folds
//! the shape arithmetic: MiniLM-L3 at 32 tokens runs in 3.9 ms instead of
//! 4.7 (benches/optimisations.md, entry 15). Each specialised plan packs
//! its own copy of the matrix weights (22 MB for MiniLM-L3), so only shapes
//! seen more than once are specialised, at most `limit` per model, on a
//! background thread while the general plan keeps answering. When the
//! plans are all taken, a shape clearly more frequent than the least used
//! one replaces it; counts halve every [`DECAY_EVERY`] calls, so the plans
//! follow the traffic as it changes. The
//! decluttered model they are optimised from stays in memory: it shares its
//! constants with the general plan, where re-reading the file for each
//! would copy MiniLM's 47 MB embedding table into every plan.

use super::ModelError;
use prometheus::IntGauge;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tract_onnx::prelude::{Symbol, TDim, TValue, TypedModel, TypedRunnableModel};
use tract_onnx::tract_core::model::IntoRunnable;

/// A shape is specialised when it arrives for this many times.
const SPECIALISE_AFTER: u32 = 2;
/// Distinct shapes counted before the counts start over, so a stream of
/// ever-new shapes cannot grow the table without bound.
const MAX_COUNTED: usize = 4096;
/// Calls between two halvings of every count.
const DECAY_EVERY: u32 = 1024;

/// Values of a model's symbols, in [`ShapePlans::symbols`] order.
type SymbolValues = Vec<usize>;

/// Whether and how a [`super::ModelPlan`] specialises itself to concrete shapes.
pub struct Specialisation {
    /// Most shapes given a plan of their own (0: none).
    pub limit: usize,
    /// The model, as logs name it.
    pub label: String,
    /// Counts the specialised plans alive.
    pub built: IntGauge,
}

/// The specialised plans of one model and the counts that choose them.
pub struct ShapePlans {
    /// The decluttered model with its symbols unbound.
    template: TypedModel,
    /// Every symbol an input dimension is, in a fixed order.
    symbols: Vec<Symbol>,
    /// For each input (in the order the plan takes them) and each axis, the
    /// index in `symbols` of the symbol that dimension is, if any.
    axes: Vec<Vec<Option<usize>>>,
    limit: usize,
    label: String,
    state: Mutex<State>,
    built: IntGauge,
}

#[derive(Default)]
struct State {
    /// Specialised plans and how often each served lately.
    ready: HashMap<SymbolValues, (Arc<TypedRunnableModel>, u32)>,
    /// How often each shape without a plan arrived lately.
    seen: HashMap<SymbolValues, u32>,
    failed: HashSet<SymbolValues>,
    building: bool,
    /// Calls since the counts were last halved.
    calls: u32,
}

impl State {
    /// Counts a call, halving every count each [`DECAY_EVERY`] calls.
    fn tick(&mut self) {
        self.calls += 1;
        if self.calls < DECAY_EVERY {
            return;
        }
        self.calls = 0;
        self.ready.values_mut().for_each(|(_, hits)| *hits /= 2);
        self.seen.retain(|_, count| {
            *count /= 2;
            *count > 0
        });
    }

    /// The plan that served least lately, with its count.
    fn least_used(&self) -> Option<(&SymbolValues, u32)> {
        self.ready
            .iter()
            .map(|(values, (_, hits))| (values, *hits))
            .min_by_key(|(_, hits)| *hits)
    }

    /// Whether a shape seen `count` times deserves a plan of its own, in
    /// a free place or instead of the least used one.
    fn deserves_plan(&self, count: u32, limit: usize) -> bool {
        if self.ready.len() < limit {
            return count >= SPECIALISE_AFTER;
        }
        self.least_used()
            .is_some_and(|(_, hits)| count >= 2 * hits + SPECIALISE_AFTER)
    }
}

impl ShapePlans {
    /// Specialisation for `template` (decluttered, not optimised) whose
    /// inputs are taken in `inputs` order; `None` when the limit is 0 or no
    /// input dimension is a bare symbol.
    pub fn new(
        template: TypedModel,
        inputs: &[String],
        specialisation: Specialisation,
    ) -> Result<Option<Arc<ShapePlans>>, ModelError> {
        if specialisation.limit == 0 {
            return Ok(None);
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut axes = Vec::with_capacity(inputs.len());
        for name in inputs {
            let index = template
                .inputs
                .iter()
                .position(|o| &template.node(o.node).name == name)
                .ok_or_else(|| ModelError::Graph {
                    doing: "specialising plans to shapes",
                    error: format!("the decluttered model lost input {name:?}"),
                })?;
            let fact = template.input_fact(index).map_err(|e| ModelError::Graph {
                doing: "specialising plans to shapes",
                error: format!("{e:#}"),
            })?;
            let input_axes = fact
                .shape
                .iter()
                .map(|dim| match dim {
                    TDim::Sym(symbol) => {
                        Some(symbols.iter().position(|s| s == symbol).unwrap_or_else(|| {
                            symbols.push(symbol.clone());
                            symbols.len() - 1
                        }))
                    }
                    _ => None,
                })
                .collect();
            axes.push(input_axes);
        }
        if symbols.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(ShapePlans {
            template,
            symbols,
            axes,
            limit: specialisation.limit,
            label: specialisation.label,
            state: Mutex::new(State::default()),
            built: specialisation.built,
        })))
    }

    /// The plan specialised to these inputs' shapes once it is built;
    /// until then counts the shape and may start building one.
    pub fn plan_for(self: &Arc<Self>, inputs: &[TValue]) -> Option<Arc<TypedRunnableModel>> {
        let values = self.values_of(inputs)?;
        let mut state = self.state.lock().ok()?;
        state.tick();
        if let Some((plan, hits)) = state.ready.get_mut(&values) {
            *hits += 1;
            return Some(plan.clone());
        }
        if state.failed.contains(&values) {
            return None;
        }
        if state.seen.len() >= MAX_COUNTED && !state.seen.contains_key(&values) {
            state.seen.clear();
        }
        let seen = state.seen.entry(values.clone()).or_insert(0);
        *seen += 1;
        let count = *seen;
        if !state.building && state.deserves_plan(count, self.limit) {
            state.building = true;
            let plans = self.clone();
            let spawned = std::thread::Builder::new()
                .name("cascade-shape-plan".into())
                .spawn(move || plans.build(values));
            if let Err(e) = spawned {
                tracing::warn!(model = %self.label, "cannot start specialising a plan: {e}");
                state.building = false;
            }
        }
        None
    }

    /// The symbol values `inputs` fix; `None` when they contradict each
    /// other or the model (the general plan then reports the mismatch).
    fn values_of(&self, inputs: &[TValue]) -> Option<SymbolValues> {
        let mut values = vec![None; self.symbols.len()];
        for (input, axes) in inputs.iter().zip(&self.axes) {
            if input.rank() != axes.len() {
                return None;
            }
            for (&size, axis) in input.shape().iter().zip(axes) {
                if let Some(symbol) = *axis {
                    match values[symbol] {
                        None => values[symbol] = Some(size),
                        Some(bound) if bound != size => return None,
                        Some(_) => {}
                    }
                }
            }
        }
        values.into_iter().collect()
    }

    /// Optimises the template with `values` bound and makes the plan ready.
    fn build(&self, values: SymbolValues) {
        let started = Instant::now();
        let bindings: HashMap<Symbol, TDim> = self
            .symbols
            .iter()
            .cloned()
            .zip(values.iter().map(|&v| TDim::Val(v as i64)))
            .collect();
        let plan = self
            .template
            .set_symbols(&bindings)
            .and_then(|model| model.into_optimized())
            .and_then(|model| model.into_runnable());
        let shape: Vec<String> = self
            .symbols
            .iter()
            .zip(&values)
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        super::memory::release_freed_memory();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.building = false;
        match plan {
            Ok(plan) => {
                tracing::info!(
                    model = %self.label,
                    shape = %shape.join(","),
                    ms = started.elapsed().as_millis() as u64,
                    "plan specialised to a shape"
                );
                if state.ready.len() >= self.limit {
                    let evicted = state.least_used().map(|(values, _)| values.clone());
                    if let Some(evicted) = evicted {
                        state.ready.remove(&evicted);
                        tracing::info!(model = %self.label, shape = ?evicted, "plan for a less used shape dropped");
                    }
                } else {
                    self.built.inc();
                }
                let count = state.seen.remove(&values).unwrap_or(0);
                state.ready.insert(values, (plan, count));
            }
            Err(e) => {
                tracing::warn!(
                    model = %self.label,
                    shape = %shape.join(","),
                    "cannot specialise the plan: {e:#}"
                );
                // Bounded like `seen`: inputs choose the shapes.
                if state.failed.len() >= MAX_COUNTED {
                    state.failed.clear();
                }
                state.failed.insert(values);
            }
        }
    }
}

impl Drop for ShapePlans {
    fn drop(&mut self) {
        if let Ok(state) = self.state.lock() {
            self.built.sub(state.ready.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::{DatumType, IntoTValue, Tensor, TypedFact};

    /// A model that returns its `[batch, 3]` input, with `batch` a symbol.
    fn identity_model() -> tract_onnx::prelude::TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let batch = model.symbols.sym("batch");
        let fact = TypedFact::dt_shape(DatumType::F32, [TDim::Sym(batch), TDim::Val(3)]);
        let x = model.add_source("x", fact)?;
        model.select_output_outlets(&[x])?;
        Ok(model)
    }

    fn specialisation(limit: usize) -> Specialisation {
        Specialisation {
            limit,
            label: "test".into(),
            built: IntGauge::new("shape_plans_test", "test").expect("gauge"),
        }
    }

    fn identity(limit: usize) -> Arc<ShapePlans> {
        let model = identity_model().expect("model");
        ShapePlans::new(model, &["x".to_string()], specialisation(limit))
            .expect("valid")
            .expect("has a symbol")
    }

    fn rows(n: usize) -> Vec<TValue> {
        let data: Vec<f32> = (0..n * 3).map(|v| v as f32).collect();
        vec![
            Tensor::from_shape(&[n, 3], &data)
                .expect("tensor")
                .into_tvalue(),
        ]
    }

    /// Calls until the plan for `n` rows is ready, at most for 10 s.
    fn specialised(plans: &Arc<ShapePlans>, n: usize) -> Option<Arc<TypedRunnableModel>> {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(plan) = plans.plan_for(&rows(n)) {
                return Some(plan);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        None
    }

    #[test]
    fn a_repeated_shape_gets_its_own_plan_that_computes_the_same() {
        let plans = identity(2);
        assert!(
            plans.plan_for(&rows(4)).is_none(),
            "first sight: general plan"
        );
        let plan = specialised(&plans, 4).expect("specialised after repeats");
        let out = plan.run(rows(4).into_iter().collect()).expect("runs");
        assert_eq!(out[0].shape(), &[4, 3]);
        assert_eq!(out[0].as_bytes(), rows(4)[0].as_bytes());
        assert_eq!(plans.built.get(), 1);
    }

    #[test]
    fn no_more_plans_than_the_limit_and_the_busier_shape_takes_the_place() {
        let plans = identity(1);
        specialised(&plans, 2).expect("first shape specialised");
        for _ in 0..5 {
            plans.plan_for(&rows(2)).expect("ready");
        }
        // Three calls of another shape are not enough to displace it ...
        for _ in 0..3 {
            assert!(plans.plan_for(&rows(5)).is_none(), "over the limit");
        }
        assert!(plans.plan_for(&rows(2)).is_some());
        // ... many more are.
        let plan = specialised(&plans, 5).expect("the busier shape gets the place");
        assert_eq!(
            plan.run(rows(5).into_iter().collect()).expect("runs")[0].shape(),
            &[5, 3]
        );
        assert!(
            plans.plan_for(&rows(2)).is_none(),
            "the idle shape lost its plan"
        );
        assert_eq!(plans.built.get(), 1);
        let gauge = plans.built.clone();
        drop(plans);
        assert_eq!(gauge.get(), 0, "dropping the plans forgets them");
    }

    #[test]
    fn counts_halve_so_old_traffic_fades() {
        let mut state = State::default();
        state.seen.insert(vec![1], 9);
        state.seen.insert(vec![2], 1);
        for _ in 0..DECAY_EVERY {
            state.tick();
        }
        assert_eq!(state.seen.get(&vec![1]), Some(&4));
        assert_eq!(
            state.seen.get(&vec![2]),
            None,
            "a count halved to 0 is forgotten"
        );
    }

    #[test]
    fn contradictory_or_misshapen_inputs_use_the_general_plan() {
        let plans = identity(4);
        let scalar = vec![Tensor::from(1f32).into_tvalue()];
        assert_eq!(plans.values_of(&scalar), None, "wrong rank");
        assert_eq!(plans.values_of(&rows(3)), Some(vec![3]));
        let none = ShapePlans::new(TypedModel::default(), &[], specialisation(4)).expect("valid");
        assert!(none.is_none(), "no symbol, nothing to specialise");
        let off = ShapePlans::new(
            identity_model().expect("model"),
            &["x".into()],
            specialisation(0),
        )
        .expect("valid");
        assert!(off.is_none(), "limit 0 turns specialisation off");
    }
}
