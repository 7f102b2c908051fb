//! cuDNN's graph (backend) API for kiln's convolutions: an execution plan per convolution, made
//! once, then run by `cudnnBackendExecute` with the call's pointers.
//!
//! Why not the legacy calls (`cudnnConvolutionForward` and its two backward twins): in cuDNN 9
//! each costs enough host time that ResNet-50's convolutions took longer on the host than the
//! GPU's kernels, so the step waited on the host. A plan made once is how PyTorch runs cuDNN
//! too.

use std::ffi::c_void;
use std::rc::Rc;

use cudarc::cudnn::sys::{
    self, cudnnBackendAttributeName_t as Attr, cudnnBackendAttributeType_t as Type,
    cudnnBackendDescriptorType_t as Kind,
};
use cudarc::cudnn::CudnnError;

use super::geometry::Geometry;

/// Which of the three convolutions, and so which operands it reads and writes:
/// - Forward: (x, w) -> y;
/// - BackwardData: (dy, w) -> dx;
/// - BackwardFilter: (x, dy) -> dw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Direction {
    Forward,
    BackwardData,
    BackwardFilter,
}

impl Direction {
    /// Elements of the first operand, the second and the result.
    pub(super) fn sizes(self, g: &Geometry) -> [usize; 3] {
        let (x, w, y) = (
            g.n * g.image(),
            g.co * g.patch(),
            g.n * g.co * g.out_pixels(),
        );
        match self {
            Self::Forward => [x, w, y],
            Self::BackwardData => [y, w, x],
            Self::BackwardFilter => [x, y, w],
        }
    }
}

fn check(status: sys::cudnnStatus_t) -> Result<(), CudnnError> {
    match status {
        sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS => Ok(()),
        e => Err(CudnnError(e)),
    }
}

/// A cuDNN handle of kiln's own (cudarc's keeps its pointer private), bound to one stream.
pub(super) struct Handle(sys::cudnnHandle_t);

impl Handle {
    /// A handle whose work runs on `stream`; the stream's context must be bound to this thread.
    pub(super) fn new(stream: sys::cudaStream_t) -> Result<Self, CudnnError> {
        let handle = Self(cudarc::cudnn::result::create_handle()?);
        // SAFETY: a live handle and a live stream of the bound context.
        unsafe { cudarc::cudnn::result::set_stream(handle.0, stream) }?;
        Ok(handle)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: made by `new` and used by nothing after this.
        let _ = unsafe { cudarc::cudnn::result::destroy_handle(self.0) };
    }
}

/// A backend descriptor, destroyed when dropped.
struct Descriptor(sys::cudnnBackendDescriptor_t);

impl Descriptor {
    fn new(kind: Kind) -> Result<Self, CudnnError> {
        let mut descriptor = std::ptr::null_mut();
        // SAFETY: cuDNN writes the new descriptor's pointer.
        check(unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut descriptor) })?;
        Ok(Self(descriptor))
    }

    /// Sets attribute `name` to `values`.
    ///
    /// # Safety
    /// `V` must be the C type cuDNN reads for `ty`.
    unsafe fn set<V>(&mut self, name: Attr, ty: Type, values: &[V]) -> Result<(), CudnnError> {
        let count = values.len() as i64;
        check(sys::cudnnBackendSetAttribute(
            self.0,
            name,
            ty,
            count,
            values.as_ptr().cast(),
        ))
    }

    fn set_i64s(&mut self, name: Attr, values: &[i64]) -> Result<(), CudnnError> {
        // SAFETY: CUDNN_TYPE_INT64 is read as int64_t.
        unsafe { self.set(name, Type::CUDNN_TYPE_INT64, values) }
    }

    fn set_descriptors(&mut self, name: Attr, values: &[&Descriptor]) -> Result<(), CudnnError> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = values.iter().map(|d| d.0).collect();
        // SAFETY: CUDNN_TYPE_BACKEND_DESCRIPTOR is read as cudnnBackendDescriptor_t.
        unsafe { self.set(name, Type::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw) }
    }

    fn set_handle(&mut self, name: Attr, handle: &Handle) -> Result<(), CudnnError> {
        // SAFETY: CUDNN_TYPE_HANDLE is read as cudnnHandle_t.
        unsafe { self.set(name, Type::CUDNN_TYPE_HANDLE, &[handle.0]) }
    }

    fn set_data_type(&mut self, name: Attr, value: sys::cudnnDataType_t) -> Result<(), CudnnError> {
        // SAFETY: CUDNN_TYPE_DATA_TYPE is read as cudnnDataType_t.
        unsafe { self.set(name, Type::CUDNN_TYPE_DATA_TYPE, &[value]) }
    }

    fn set_f32(&mut self, name: Attr, value: f32) -> Result<(), CudnnError> {
        // SAFETY: CUDNN_TYPE_FLOAT is read as float.
        unsafe { self.set(name, Type::CUDNN_TYPE_FLOAT, &[value]) }
    }

    fn finalize(self) -> Result<Self, CudnnError> {
        // SAFETY: a live descriptor.
        check(unsafe { sys::cudnnBackendFinalize(self.0) })?;
        Ok(self)
    }

    /// Up to `max` values of attribute `name`.
    ///
    /// # Safety
    /// `V` must be the C type cuDNN writes for `ty`.
    unsafe fn get<V: Copy>(
        &self,
        name: Attr,
        ty: Type,
        max: usize,
        zero: V,
    ) -> Result<Vec<V>, CudnnError> {
        let mut values = vec![zero; max];
        let mut count = 0i64;
        check(sys::cudnnBackendGetAttribute(
            self.0,
            name,
            ty,
            max as i64,
            &mut count,
            values.as_mut_ptr().cast(),
        ))?;
        values.truncate(count.clamp(0, max as i64) as usize);
        Ok(values)
    }

    /// Attribute `name`'s descriptors, made of `kind`, up to `max` of them.
    fn get_descriptors(
        &self,
        name: Attr,
        kind: Kind,
        max: usize,
    ) -> Result<Vec<Descriptor>, CudnnError> {
        let mut made = (0..max)
            .map(|_| Descriptor::new(kind))
            .collect::<Result<Vec<_>, _>>()?;
        let mut raw: Vec<sys::cudnnBackendDescriptor_t> = made.iter().map(|d| d.0).collect();
        let mut count = 0i64;
        // SAFETY: cuDNN fills the descriptors it was given, at most `max` of them.
        check(unsafe {
            sys::cudnnBackendGetAttribute(
                self.0,
                name,
                Type::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                max as i64,
                &mut count,
                raw.as_mut_ptr().cast(),
            )
        })?;
        made.truncate(count.clamp(0, max as i64) as usize);
        Ok(made)
    }

    /// How many values attribute `name` holds.
    fn count(&self, name: Attr, ty: Type) -> Result<usize, CudnnError> {
        let mut count = 0i64;
        // SAFETY: with no room asked for, cuDNN only writes the count.
        check(unsafe {
            sys::cudnnBackendGetAttribute(self.0, name, ty, 0, &mut count, std::ptr::null_mut())
        })?;
        Ok(count.max(0) as usize)
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: made by `new`, and no longer used.
        let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

/// The operands' ids in a graph and in a call's variant pack.
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;

/// One convolution as cuDNN's graph describes it: dimensions in (n, c, h, w) order whatever the
/// layout, the layout in the strides.
#[derive(Debug, Clone, Copy)]
pub(super) struct Convolution {
    pub direction: Direction,
    pub channels_last: bool,
    pub data_type: sys::cudnnDataType_t,
    pub x: [i64; 4],
    pub w: [i64; 4],
    pub y: [i64; 4],
    pub stride: i64,
    pub padding: i64,
    /// The largest power of two, at most 16, that every operand's address is a multiple of.
    pub alignment: i64,
}

impl Convolution {
    fn tensor(&self, id: i64, [n, c, h, w]: [i64; 4]) -> Result<Descriptor, CudnnError> {
        let strides = if self.channels_last {
            [h * w * c, 1, w * c, c]
        } else {
            [c * h * w, h * w, w, 1]
        };
        let mut t = Descriptor::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        t.set_data_type(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, self.data_type)?;
        t.set_i64s(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, &[n, c, h, w])?;
        t.set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, &strides)?;
        t.set_i64s(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[id])?;
        t.set_i64s(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[self.alignment])?;
        t.finalize()
    }

    /// The graph of this one operation, computing in f32 whatever the data type.
    fn graph(&self, handle: &Handle) -> Result<Descriptor, CudnnError> {
        let (x, w, y) = (
            self.tensor(X, self.x)?,
            self.tensor(W, self.w)?,
            self.tensor(Y, self.y)?,
        );
        let mut conv = Descriptor::new(Kind::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        conv.set_data_type(
            Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        // SAFETY: CUDNN_TYPE_CONVOLUTION_MODE is read as cudnnConvolutionMode_t.
        unsafe {
            conv.set(
                Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
                Type::CUDNN_TYPE_CONVOLUTION_MODE,
                &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
            )
        }?;
        conv.set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[2])?;
        conv.set_i64s(Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS, &[1, 1])?;
        conv.set_i64s(
            Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
            &[self.stride; 2],
        )?;
        conv.set_i64s(
            Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
            &[self.padding; 2],
        )?;
        conv.set_i64s(
            Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
            &[self.padding; 2],
        )?;
        let conv = conv.finalize()?;

        let (kind, [x_name, w_name, y_name, conv_name, alpha, beta]) = match self.direction {
            Direction::Forward => (
                Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR,
                [
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
                ],
            ),
            Direction::BackwardData => (
                Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR,
                [
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA,
                ],
            ),
            Direction::BackwardFilter => (
                Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR,
                [
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
                    Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA,
                ],
            ),
        };
        let mut op = Descriptor::new(kind)?;
        op.set_descriptors(x_name, &[&x])?;
        op.set_descriptors(w_name, &[&w])?;
        op.set_descriptors(y_name, &[&y])?;
        op.set_descriptors(conv_name, &[&conv])?;
        op.set_f32(alpha, 1.0)?;
        op.set_f32(beta, 0.0)?;
        let op = op.finalize()?;

        let mut graph = Descriptor::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        graph.set_handle(Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, handle)?;
        graph.set_descriptors(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &[&op])?;
        graph.finalize()
    }

    /// The variant pack's ids of the call's first operand, its second and its result (see
    /// [`Direction`]).
    fn ids(&self) -> [i64; 3] {
        match self.direction {
            Direction::Forward => [X, W, Y],
            Direction::BackwardData => [Y, W, X],
            Direction::BackwardFilter => [X, Y, W],
        }
    }
}

/// Which engines may run a convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Accept {
    /// f32 data on tensor cores, i.e. rounded to TF32.
    pub tf32: bool,
}

/// Engine configurations tried when a convolution's plan is chosen, in the heuristics' order.
/// Trying every one that mode A and the fallback list propose made a cold run's first epoch
/// longer than a whole warm run.
const MOST_CANDIDATES: usize = 8;

/// The first [`MOST_CANDIDATES`] engine configurations cuDNN's heuristics propose for
/// `convolution` (mode A's, or where it has none that `accept` allows, the fallback list's),
/// that `accept` allows, each named by where it was found ("A3", "F0"): the names
/// are stable for one cuDNN version on one device, and so can be kept on disk. With `only` (a
/// name kept from an earlier run), just that one: one mode asked, one configuration's notes
/// read, which is all a process that remembers its choices pays before its first step.
pub(super) fn candidates(
    handle: &Handle,
    convolution: &Convolution,
    accept: Accept,
    only: Option<&str>,
) -> Result<Candidates, CudnnError> {
    let graph = convolution.graph(handle)?;
    let mut configs = Vec::new();
    let mut rejected = Vec::new();
    for (mode, prefix) in [
        (sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A, "A"),
        (sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK, "F"),
    ] {
        let wanted = match only {
            None => None,
            Some(name) => match name.strip_prefix(prefix).map(str::parse::<usize>) {
                Some(Ok(i)) => Some(i),
                _ => continue,
            },
        };
        if only.is_none() && !configs.is_empty() {
            // Mode A's list suffices: the fallback list is what runs when it has nothing.
            break;
        }
        let Ok(found) = heuristics(&graph, mode) else {
            // A mode that has nothing for this graph; the other may.
            continue;
        };
        for (i, config) in found.into_iter().enumerate() {
            if wanted.is_some_and(|w| w != i) || configs.len() == MOST_CANDIDATES {
                continue;
            }
            let name = format!("{prefix}{i}");
            match allowed(&config, convolution.data_type, accept) {
                Ok(true) => configs.push((name, config)),
                Ok(false) => rejected.push(name),
                Err(e) => rejected.push(format!("{name} ({e})")),
            }
        }
    }
    if !rejected.is_empty() {
        tracing::trace!(
            "cuDNN engine configurations left out: {}",
            rejected.join(", ")
        );
    }
    Ok(Candidates {
        convolution: *convolution,
        graph,
        configs,
    })
}

fn heuristics(
    graph: &Descriptor,
    mode: sys::cudnnBackendHeurMode_t,
) -> Result<Vec<Descriptor>, CudnnError> {
    let mut heuristics = Descriptor::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heuristics.set_descriptors(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?;
    // SAFETY: CUDNN_TYPE_HEUR_MODE is read as cudnnBackendHeurMode_t.
    unsafe {
        heuristics.set(
            Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
            Type::CUDNN_TYPE_HEUR_MODE,
            &[mode],
        )
    }?;
    let heuristics = heuristics.finalize()?;
    let count = heuristics.count(
        Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
        Type::CUDNN_TYPE_BACKEND_DESCRIPTOR,
    )?;
    heuristics.get_descriptors(
        Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
        Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR,
        count,
    )
}

/// Whether an engine configuration computes as kiln promises: f32 exactly unless TF32 is
/// allowed, no inputs rounded down, f32 sums for bf16 and f16, and no kernel compiled at run time
/// (seconds on first use, and NVRTC that a machine may lack).
fn allowed(
    config: &Descriptor,
    data_type: sys::cudnnDataType_t,
    accept: Accept,
) -> Result<bool, CudnnError> {
    use sys::cudnnBackendBehaviorNote_t as B;
    use sys::cudnnBackendNumericalNote_t as N;
    let engine = config
        .get_descriptors(
            Attr::CUDNN_ATTR_ENGINECFG_ENGINE,
            Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR,
            1,
        )?
        .pop()
        .ok_or(CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM))?;
    // The notes are C enums (32 bits), read as plain numbers: a cuDNN newer than these bindings
    // may name notes they do not, which must not become a Rust enum. Room for more than any
    // cuDNN has named.
    const ROOM: usize = 32;
    // SAFETY (both): an array of ROOM 32-bit values.
    let numerical = unsafe {
        engine.get(
            Attr::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
            Type::CUDNN_TYPE_NUMERICAL_NOTE,
            ROOM,
            0u32,
        )
    }?;
    let behaviour = unsafe {
        engine.get(
            Attr::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,
            Type::CUDNN_TYPE_BEHAVIOR_NOTE,
            ROOM,
            0u32,
        )
    }?;
    let f32_data = data_type == sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let tensor_cores = N::CUDNN_NUMERICAL_NOTE_TENSOR_CORE as u32;
    let rounded = [
        N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS as u32,
        N::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION as u32,
    ];
    let refused = numerical
        .iter()
        .any(|&note| (note == tensor_cores && f32_data && !accept.tf32) || rounded.contains(&note))
        || behaviour.contains(&(B::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION as u32));
    Ok(!refused)
}

/// The engine configurations that may run one convolution, and the graph they were found for.
pub(super) struct Candidates {
    convolution: Convolution,
    graph: Descriptor,
    configs: Vec<(String, Descriptor)>,
}

impl Candidates {
    /// The execution plan of the configuration named `name`.
    pub(super) fn plan(self, handle: &Handle, name: &str) -> Option<Result<Plan, CudnnError>> {
        let (name, config) = self.configs.into_iter().find(|(n, _)| n == name)?;
        let graph = Rc::new(self.graph);
        Some(Plan::new(handle, self.convolution, graph, &name, config))
    }

    /// Every configuration's execution plan, or why it has none.
    pub(super) fn plans(self, handle: &Handle) -> Vec<(String, Result<Plan, CudnnError>)> {
        let graph = Rc::new(self.graph);
        self.configs
            .into_iter()
            .map(|(name, config)| {
                let plan = Plan::new(handle, self.convolution, graph.clone(), &name, config);
                (name, plan)
            })
            .collect()
    }
}

/// A convolution's execution plan: what runs it, with the workspace it needs.
pub(super) struct Plan {
    plan: Descriptor,
    ids: [i64; 3],
    /// Bytes of workspace it needs.
    pub workspace: usize,
    /// The configuration's name among the candidates (see [`candidates`]).
    pub name: String,
    // What the plan was made from, kept while it lives.
    _config: Descriptor,
    _graph: Rc<Descriptor>,
}

impl Plan {
    fn new(
        handle: &Handle,
        convolution: Convolution,
        graph: Rc<Descriptor>,
        name: &str,
        config: Descriptor,
    ) -> Result<Self, CudnnError> {
        let mut plan = Descriptor::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        plan.set_handle(Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, handle)?;
        plan.set_descriptors(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&config])?;
        let plan = plan.finalize()?;
        // SAFETY: CUDNN_TYPE_INT64 is written as int64_t.
        let workspace = unsafe {
            plan.get(
                Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                Type::CUDNN_TYPE_INT64,
                1,
                0i64,
            )
        }?;
        Ok(Self {
            plan,
            ids: convolution.ids(),
            workspace: workspace.first().map_or(0, |&b| b.max(0) as usize),
            name: name.to_string(),
            _config: config,
            _graph: graph,
        })
    }

    /// Runs the convolution: `operands` are the device addresses of the call's first operand,
    /// its second and its result, in the sense of [`Direction`].
    ///
    /// # Safety
    /// The addresses must hold the elements the plan's convolution reads and writes, aligned as
    /// its [`Convolution::alignment`] says, and `workspace` at least [`Self::workspace`] bytes
    /// (or be null where that is 0), all on the handle's stream.
    pub(super) unsafe fn execute(
        &self,
        handle: &Handle,
        operands: [u64; 3],
        workspace: u64,
    ) -> Result<(), CudnnError> {
        let pointers = operands.map(|p| p as *mut c_void);
        let mut pack = Descriptor::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set_i64s(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, &self.ids)?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Type::CUDNN_TYPE_VOID_PTR,
            &pointers,
        )?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Type::CUDNN_TYPE_VOID_PTR,
            &[workspace as *mut c_void],
        )?;
        let pack = pack.finalize()?;
        check(sys::cudnnBackendExecute(handle.0, self.plan.0, pack.0))
    }
}
