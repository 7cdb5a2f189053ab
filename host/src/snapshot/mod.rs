//! Snapshots of a component stage after its start-up work.
//!
//! A component that exports `cascade:inference/initialize` (WIT worlds
//! `initialized-preprocessor` and `initialized-postprocessor`) has it
//! called once per grant, in an instance sandboxed exactly as the stage's
//! own instances are. `wasmtime-wizer` then rewrites the component so its
//! memories and globals start as that instance left them, and every later
//! instance (after a scale to zero, or beside busy ones) skips the work:
//! for `bert-tokenizer`, parsing `tokenizer.json`, ~20 ms of its first call.
//!
//! What a snapshot cannot carry is host state: handles to files, streams
//! or models live in the store's resource table, not in linear memory. An
//! instance that still holds one after `initialize` is not snapshotted.
//! [`cache`] keeps compiled snapshots on disk and makes them off the
//! request path.

mod background;
pub mod cache;

use crate::bindings::{GuestError, export_names};
use crate::sandbox::{Grant, StageState, linker};
use crate::stage::{ComponentStage, INSTANTIATE_TIMEOUT, sandboxed_store};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Instance, Lift, WasmList};
use wasmtime::{Store, Trap};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

/// The function `initialize` exports.
const INITIALIZE_FUNC: &str = "initialize";

/// How long reading the instance's state back may take.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no snapshot was made of a stage; its instances then start as they
/// would without `initialize`.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Wizer could not instrument or rewrite it, or the result did not compile.
    #[error("preparing the component for a snapshot: {0:#}")]
    Instrument(wasmtime::Error),
    /// The pools had no room, or the sandbox could not be set up.
    #[error("starting the instance to snapshot: {0:#}")]
    Instantiate(wasmtime::Error),
    /// It exports `initialize` with another type.
    #[error("its `initialize` is not `func() -> result<_, error>`: {0:#}")]
    WrongType(wasmtime::Error),
    /// `initialize` trapped or ran past its deadline.
    #[error("its `initialize` {0}")]
    Trapped(String),
    /// `initialize` returned an error (e.g. a bad configuration).
    #[error("its `initialize` failed: {0}")]
    Failed(String),
    /// Afterwards the instance still held a file, directory or stream.
    #[error("it still holds a handle (file, directory or stream) after `initialize`")]
    HoldsHandles,
    /// Reading its memories and globals back failed.
    #[error("reading the initialised instance back: {0:#}")]
    ReadBack(wasmtime::Error),
}

/// Runs `initialize` in an instance of `stage` (whose component binary is
/// `wasm`) sandboxed by `grant`, and returns the component rewritten to
/// start from the state it left.
pub async fn snapshot(
    stage: &ComponentStage,
    wasm: &[u8],
    grant: &Grant,
) -> Result<Vec<u8>, SnapshotError> {
    let wizer = Wizer::new();
    let (context, instrumented) = wizer
        .instrument_component(wasm)
        .map_err(SnapshotError::Instrument)?;
    let component =
        Component::new(stage.engine(), &instrumented).map_err(SnapshotError::Instrument)?;
    let _reservation = stage.reserve().map_err(SnapshotError::Instantiate)?;
    let mut store = sandboxed_store(stage.engine(), grant).map_err(SnapshotError::Instantiate)?;
    let instance = linker(stage.engine(), stage.world())
        .and_then(|linker| linker.instantiate_pre(&component))
        .map_err(SnapshotError::Instantiate)?
        .instantiate_async(&mut store)
        .await
        .map_err(SnapshotError::Instantiate)?;
    initialize(&mut store, &instance).await?;
    if store.data().holds_handles() {
        return Err(SnapshotError::HoldsHandles);
    }
    store
        .data_mut()
        .set_deadline(Instant::now() + READ_BACK_TIMEOUT);
    let mut state = InstanceState {
        store: &mut store,
        instance,
        failure: None,
    };
    let rewritten = wizer
        .snapshot_component(&context, &mut state)
        .await
        .map_err(SnapshotError::Instrument)?;
    match state.failure {
        Some(failure) => Err(SnapshotError::ReadBack(failure)),
        None => Ok(rewritten),
    }
}

/// Calls the instance's `initialize`, held to [`INSTANTIATE_TIMEOUT`].
async fn initialize(
    store: &mut Store<StageState>,
    instance: &Instance,
) -> Result<(), SnapshotError> {
    let missing = || wasmtime::format_err!("no export {}", export_names::INITIALIZE);
    let interface = instance
        .get_export_index(&mut *store, None, export_names::INITIALIZE)
        .ok_or_else(missing)
        .map_err(SnapshotError::WrongType)?;
    let func = instance
        .get_export_index(&mut *store, Some(&interface), INITIALIZE_FUNC)
        .ok_or_else(missing)
        .and_then(|index| {
            instance.get_typed_func::<(), (Result<(), GuestError>,)>(&mut *store, index)
        })
        .map_err(SnapshotError::WrongType)?;
    store
        .data_mut()
        .set_deadline(Instant::now() + INSTANTIATE_TIMEOUT);
    let (result,) = func
        .call_async(&mut *store, ())
        .await
        .map_err(|e| SnapshotError::Trapped(trap_of(&e)))?;
    result.map_err(|e| {
        SnapshotError::Failed(match e {
            GuestError::InvalidInput(m) | GuestError::Internal(m) => m,
        })
    })
}

/// What stopped `initialize`, on one line (a trap's error carries the
/// guest's backtrace on many).
fn trap_of(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            format!("ran past its {} s deadline", INSTANTIATE_TIMEOUT.as_secs())
        }
        Some(trap) => format!("trapped: {trap}"),
        None => format!("failed: {}", error.root_cause()),
    }
}

/// The initialised instance, read back through the accessors Wizer's
/// instrumentation exported. The trait has no way to fail, so the first
/// failure is kept here and the read answers zeros from then on.
struct InstanceState<'a> {
    store: &'a mut Store<StageState>,
    instance: Instance,
    failure: Option<wasmtime::Error>,
}

impl InstanceState<'_> {
    async fn call<R: Lift + Send + Sync + 'static, O: Default>(
        &mut self,
        interface: &str,
        func: &str,
        take: impl FnOnce(&Store<StageState>, R) -> O,
    ) -> O {
        if self.failure.is_some() {
            return O::default();
        }
        match self.try_call(interface, func).await {
            Ok(value) => take(self.store, value),
            Err(e) => {
                self.failure = Some(e);
                O::default()
            }
        }
    }

    async fn try_call<R: Lift + Send + Sync + 'static>(
        &mut self,
        interface: &str,
        func: &str,
    ) -> wasmtime::Result<R> {
        let missing = || wasmtime::format_err!("no accessor {interface}#{func}");
        let exported = self
            .instance
            .get_export_index(&mut *self.store, None, interface)
            .ok_or_else(missing)?;
        let index = self
            .instance
            .get_export_index(&mut *self.store, Some(&exported), func)
            .ok_or_else(missing)?;
        let typed = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, index)?;
        Ok(typed.call_async(&mut *self.store, ()).await?.0)
    }
}

impl ComponentInstanceState for InstanceState<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        let read = self
            .call(instance, func, |store, list: WasmList<u8>| {
                contents(list.as_le_slice(store));
                true
            })
            .await;
        if !read && self.failure.is_none() {
            self.failure = Some(wasmtime::format_err!("{instance}#{func} not read"));
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, value: i32| value).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, value: i64| value).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, value: f32| value.to_bits())
            .await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, value: f64| value.to_bits())
            .await
    }
}
