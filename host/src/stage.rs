//! A component stage: a compiled, pre-linked component of one Cascade world,
//! and the live instances made from it.
//!
//! Compiling and linking happen once per component ([`ComponentStage`]);
//! each [`StageInstance`] is a store plus an instantiated component, cheap
//! to create from the `InstancePre` and reusable across calls until a trap.

use crate::bindings::{
    Inferencer, InferencerPre, Message, Postprocessor, PostprocessorPre, Preprocessor,
    PreprocessorPre, Tensor, export_names,
};
use crate::capacity::{Capacity, Footprint, Reservation};
use crate::engine::ServingEngine;
pub use crate::error::StageError;
pub use crate::sandbox::Grant;
use crate::sandbox::{StageState, linker};
pub use cascade_registry::records::World;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Result;
use wasmtime::component::Component;
use wasmtime::error::Context;
use wasmtime::{Engine, Store, UpdateDeadline};

/// Why a component cannot serve as a stage: checked at publish (a 400
/// naming the problem) and again when a host links it.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// It exports none, or more than one, of the Cascade worlds' functions.
    #[error(
        "a Cascade component exports exactly one of {}, {} or {}; this one exports [{}]",
        export_names::PREPROCESS,
        export_names::POSTPROCESS,
        export_names::INFER,
        .0.join(", ")
    )]
    NoCascadeWorld(Vec<String>),
    /// A component of another world imports `wasi:nn`.
    #[error("this {world} imports {import}; only inferencer components may use wasi:nn")]
    NnOutsideInferencer {
        /// Its world.
        world: World,
        /// The `wasi:nn` interface it imports.
        import: String,
    },
    /// It imports something the sandbox does not offer.
    #[error("the component imports something the sandbox does not offer: {0:#}")]
    Unlinkable(wasmtime::Error),
}

/// The world `component` exports.
pub fn world_of(component: &Component, engine: &Engine) -> Result<World, ComponentError> {
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let has = |name: &str| exports.iter().any(|e| e == name);
    match (
        has(export_names::PREPROCESS),
        has(export_names::POSTPROCESS),
        has(export_names::INFER),
    ) {
        (true, false, false) => Ok(World::Preprocessor),
        (false, true, false) => Ok(World::Postprocessor),
        (false, false, true) => Ok(World::Inferencer),
        _ => Err(ComponentError::NoCascadeWorld(exports)),
    }
}

/// Whether `component`, of `world`, exports `initialize`: start-up work a
/// host may run once and snapshot. Inferencers never qualify: their
/// start-up work would hold `wasi:nn` handles, which a snapshot cannot keep.
pub fn offers_initialize(component: &Component, world: World) -> bool {
    world != World::Inferencer
        && component
            .get_export_index(None, export_names::INITIALIZE)
            .is_some()
}

/// Checks that `component` imports only what `world` may: `wasi:nn` is for
/// inferencers; any other import the sandbox lacks fails to link.
pub fn check_imports(
    world: World,
    component: &Component,
    engine: &Engine,
) -> Result<(), ComponentError> {
    let ty = component.component_type();
    if world != World::Inferencer
        && let Some((name, _)) = ty
            .imports(engine)
            .find(|(name, _)| name.starts_with("wasi:nn/"))
    {
        return Err(ComponentError::NnOutsideInferencer {
            world,
            import: name.to_string(),
        });
    }
    linker(engine, world)
        .and_then(|linker| linker.instantiate_pre(component))
        .map(drop)
        .map_err(ComponentError::Unlinkable)
}

enum Prepared {
    Pre(PreprocessorPre<StageState>),
    Post(PostprocessorPre<StageState>),
    Infer(InferencerPre<StageState>),
}

/// A compiled component, linked against the sandbox's imports.
pub struct ComponentStage {
    engine: Engine,
    world: World,
    prepared: Prepared,
    footprint: Footprint,
    capacity: Arc<Capacity>,
    /// Whether it exports `initialize` (see `crate::snapshot`).
    initializes: bool,
    /// Whether it is a snapshot taken after `initialize`.
    snapshot: bool,
}

impl ComponentStage {
    /// Compiles the component in `path` and links it.
    pub fn from_file(engine: &ServingEngine, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let component = Component::from_file(engine.engine(), path)
            .with_context(|| format!("compiling component {}", path.display()))?;
        Self::new(engine, component, path)
    }

    /// Links an already compiled component, whose binary is at `wasm` (its
    /// footprint in the instance pools is counted from it).
    pub fn new(engine: &ServingEngine, component: Component, wasm: &Path) -> Result<Self> {
        let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
        let footprint = Footprint::of(&bytes)?;
        Self::link(
            engine.engine(),
            engine.capacity().clone(),
            component,
            footprint,
            false,
        )
    }

    /// Links `snapshot`, the component of `self` rewritten after its
    /// `initialize` (see `crate::snapshot`): same world, same footprint.
    pub fn snapshot_of(&self, snapshot: Component) -> Result<Self> {
        Self::link(
            &self.engine,
            self.capacity.clone(),
            snapshot,
            self.footprint,
            true,
        )
    }

    fn link(
        engine: &Engine,
        capacity: Arc<Capacity>,
        component: Component,
        footprint: Footprint,
        snapshot: bool,
    ) -> Result<Self> {
        let engine = engine.clone();
        let world = world_of(&component, &engine)?;
        let initializes = offers_initialize(&component, world);
        let pre = linker(&engine, world)?
            .instantiate_pre(&component)
            .context("linking component")?;
        let prepared = match world {
            World::Preprocessor => Prepared::Pre(PreprocessorPre::new(pre)?),
            World::Postprocessor => Prepared::Post(PostprocessorPre::new(pre)?),
            World::Inferencer => Prepared::Infer(InferencerPre::new(pre)?),
        };
        Ok(ComponentStage {
            engine,
            world,
            prepared,
            footprint,
            capacity,
            initializes,
            snapshot,
        })
    }

    /// The world this stage implements.
    pub fn world(&self) -> World {
        self.world
    }

    /// What one instance takes from the engine's pools.
    pub fn footprint(&self) -> Footprint {
        self.footprint
    }

    /// Whether a snapshot after its `initialize` can be made of it.
    pub fn initializes(&self) -> bool {
        self.initializes && !self.snapshot
    }

    /// Whether its instances start from a snapshot.
    pub fn is_snapshot(&self) -> bool {
        self.snapshot
    }

    /// The engine it is compiled for.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Takes room in the pools for one instance.
    pub fn reserve(&self) -> Result<Reservation> {
        self.capacity
            .reserve(self.footprint)
            .map_err(wasmtime::Error::new)
    }

    /// A fresh instance in its own store, sandboxed by `grant`.
    ///
    /// Instantiation runs guest code (its start functions), so it is held to
    /// [`INSTANTIATE_TIMEOUT`] like a call is held to its deadline.
    /// Fails with [`Exhausted`] when the pools have no room for it now.
    pub async fn instantiate(&self, grant: &Grant) -> Result<StageInstance> {
        let reservation = self.reserve()?;
        let mut store = sandboxed_store(&self.engine, grant)?;
        let failed = "instantiating";
        let bound = match &self.prepared {
            Prepared::Pre(pre) => {
                Bound::Pre(pre.instantiate_async(&mut store).await.context(failed)?)
            }
            Prepared::Post(pre) => {
                Bound::Post(pre.instantiate_async(&mut store).await.context(failed)?)
            }
            Prepared::Infer(pre) => {
                Bound::Infer(pre.instantiate_async(&mut store).await.context(failed)?)
            }
        };
        Ok(StageInstance {
            store,
            bound,
            timeout: Duration::from_secs(30),
            _reservation: reservation,
        })
    }
}

/// How long a guest's start functions may run.
pub const INSTANTIATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A store sandboxed by `grant`, its memory limited, its guest stopped at
/// the deadline (set to [`INSTANTIATE_TIMEOUT`] from now).
pub fn sandboxed_store(engine: &Engine, grant: &Grant) -> Result<Store<StageState>> {
    let mut store = Store::new(engine, StageState::new(grant)?);
    store.limiter(|state| state.limits());
    // At every tick: stop a guest past its deadline, else let the
    // reactor run other tasks before it goes on.
    store.epoch_deadline_callback(|store| {
        Ok(if store.data().past_deadline() {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        })
    });
    store.set_epoch_deadline(1);
    store
        .data_mut()
        .set_deadline(Instant::now() + INSTANTIATE_TIMEOUT);
    Ok(store)
}

enum Bound {
    Pre(Preprocessor),
    Post(Postprocessor),
    Infer(Inferencer),
}

/// One live, sandboxed instance of a stage.
pub struct StageInstance {
    store: Store<StageState>,
    bound: Bound,
    timeout: Duration,
    /// Its share of the pools, given back after the store is dropped.
    _reservation: Reservation,
}

impl StageInstance {
    /// Sets the deadline applied to each call.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `preprocess`.
    pub async fn preprocess(&mut self, input: Message) -> Result<Vec<Tensor>, StageError> {
        self.arm_deadline();
        let Bound::Pre(bound) = &self.bound else {
            return Err(StageError::Internal("stage is not a preprocessor".into()));
        };
        let result = bound
            .cascade_inference_preprocess()
            .call_preprocess(&mut self.store, &input)
            .await;
        result
            .map_err(StageError::from_trap)?
            .map_err(StageError::from_guest)
    }

    /// Runs `postprocess`.
    pub async fn postprocess(&mut self, tensors: Vec<Tensor>) -> Result<Message, StageError> {
        self.arm_deadline();
        let Bound::Post(bound) = &self.bound else {
            return Err(StageError::Internal("stage is not a postprocessor".into()));
        };
        let result = bound
            .cascade_inference_postprocess()
            .call_postprocess(&mut self.store, &tensors)
            .await;
        result
            .map_err(StageError::from_trap)?
            .map_err(StageError::from_guest)
    }

    /// Runs `infer`.
    pub async fn infer(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, StageError> {
        self.arm_deadline();
        let Bound::Infer(bound) = &self.bound else {
            return Err(StageError::Internal("stage is not an inferencer".into()));
        };
        let result = bound
            .cascade_inference_infer()
            .call_infer(&mut self.store, inputs)
            .await;
        result
            .map_err(StageError::from_trap)?
            .map_err(StageError::from_guest)
    }

    fn arm_deadline(&mut self) {
        self.store
            .data_mut()
            .set_deadline(Instant::now() + self.timeout);
        self.store.set_epoch_deadline(1);
    }
}
