// step_kernels.cu - the small per-step device kernels of overlapd.kernels._cuda.
//
// Each replaces a chain of small framework ops that the step used to launch
// one by one (their ops fallbacks live in stages/ and are what CPU builds
// run). The launchers take raw device pointers and a raw cudaStream_t as
// integers, so Paddle and Torch share them, and never synchronize: a launch
// queued on the current stream during CUDA graph capture is captured like any
// other kernel. Every array is contiguous int64 unless said otherwise; rows
// and slots are indices that the host already validated.
//
// - build_sampling_params: per step row, gather the row's slot's sampling
//   parameters and seed state (moved `column` outputs on for a verify row's
//   token column), turn the state into the row's uniform (the exact integer
//   hash of stages/sampling/sampler.py) and optionally advance a plain row's slot's
//   seed state in place.
// - settle_verified_rows: after a verify step, move each verify row's slot's
//   seed state on by the tokens the row emits, and keep how many of its
//   columns it did not emit (the slot's lag).
// - apply_lag: before a step, move the rows chained on a verify row back by
//   their slot's lag (positions, lengths, output indices, the input token).
// - update_input_ids: decode inputs taken from the previous step's samples.
// - stop_flags: the token-level finish code of every row that sampled.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

// Must match stages/sampling/sampler.py (SEED_*, _HASH_MUL) and stages/step_types.py (FinishReason).
constexpr int64_t kSeedModulus = int64_t{1} << 31;
constexpr int64_t kSeedIncrement = 0x1E3779B1;
constexpr uint32_t kHashMul = 0x45D9F3B;
constexpr int64_t kFinishEos = 1;
constexpr int64_t kFinishStop = 2;
constexpr int64_t kFinishLength = 3;

constexpr int kThreads = 128;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// A launch error (bad configuration, no device) surfaces at once; errors of
// the kernel itself surface at the step's next synchronizing call, as any
// framework op's would.
void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void check_rows(int64_t n, const char* what) {
  if (n < 0 || n > (int64_t{1} << 30)) throw std::invalid_argument(std::string(what) + ": bad row count");
}

// The sampler's hash, in uint32 arithmetic: for a state in [0, 2**31) the
// int64 ops version computes (v * kHashMul) mod 2**32, which is exactly the
// wrapping uint32 product. The float conversion is exact (x >> 8 < 2**24,
// and the scale is a power of two), so the result is bit-identical.
__device__ __forceinline__ float uniform_from_state(int64_t state) {
  uint32_t x = static_cast<uint32_t>(state);
  x = ((x >> 16) ^ x) * kHashMul;
  x = ((x >> 16) ^ x) * kHashMul;
  x = (x >> 16) ^ x;
  return static_cast<float>(x >> 8) * 0x1p-24f;
}

// One thread per step row. A plain row's slot is distinct within a step, so
// the thread that reads its seed state is the only one that advances it, and
// it reads before it writes: the step sees the state before the advance. The
// columns of a verify row share their slot and only read it.
__global__ void build_sampling_params_kernel(const float* __restrict__ temperature, const float* __restrict__ top_p,
                                             const int64_t* __restrict__ top_k, int64_t* seed_state,
                                             const int64_t* __restrict__ row_slots,
                                             const int64_t* __restrict__ sample_mask,
                                             const int64_t* __restrict__ column, float* __restrict__ out_temperature,
                                             float* __restrict__ out_top_p, int64_t* __restrict__ out_top_k,
                                             int64_t* __restrict__ out_seed_state, float* __restrict__ out_uniform,
                                             int64_t rows, bool advance) {
  int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  int64_t slot = row_slots[r];
  int64_t state = seed_state[slot];
  int64_t col = column[r];
  out_temperature[r] = temperature[slot];
  out_top_p[r] = top_p[slot];
  out_top_k[r] = top_k[slot];
  // column < 2**31 / increment is far above any verify width: no overflow
  int64_t own = col > 0 ? (state + col * kSeedIncrement) % kSeedModulus : state;
  out_seed_state[r] = own;
  out_uniform[r] = uniform_from_state(own);
  if (advance && col < 0 && sample_mask[r] > 0) seed_state[slot] = (state + kSeedIncrement) % kSeedModulus;
}

// One thread per step row; the thread of a verify row's column 0 counts the
// row's columns (column[r + j] == j) and the tokens it emits (the columns up
// to the first whose predecessor did not draw its draft), then (advance)
// moves the slot's seed state on by the emitted tokens and stores the lag.
__global__ void settle_verified_rows_kernel(int64_t* seed_state, int64_t* lag, const int64_t* __restrict__ row_slots,
                                            const int64_t* __restrict__ column, const int64_t* __restrict__ drew,
                                            int64_t rows, bool advance) {
  int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows || column[r] != 0) return;
  int64_t width = 1;
  while (r + width < rows && column[r + width] == width) ++width;
  int64_t emitted = 1;
  while (emitted < width && drew[r + emitted - 1] == 1) ++emitted;
  int64_t slot = row_slots[r];
  if (advance) seed_state[slot] = (seed_state[slot] + emitted * kSeedIncrement) % kSeedModulus;
  lag[slot] = width - emitted;
}

// One thread per step row. A row chained on its request's verify row was
// staged as if that row emitted every column; it emitted lag[slot] fewer, so
// the row's positions, length and output index move back by that much, and
// its input token (from the previous step's output) is the one lag columns
// before the last. Runs before update_input_ids, on the freshly loaded step.
__global__ void apply_lag_kernel(int64_t* start_pos, int64_t* seq_lens, int64_t* out_index, int64_t* prev_rows,
                                 const int64_t* __restrict__ query_start_loc, const int64_t* __restrict__ row_slots,
                                 const int64_t* __restrict__ lagged, const int64_t* __restrict__ lag, int64_t rows) {
  int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows || lagged[r] == 0) return;
  int64_t back = lag[row_slots[r]];
  start_pos[r] -= back;
  seq_lens[r] -= back;
  out_index[r] -= back;
  int64_t t = query_start_loc[r];
  if (prev_rows[t] >= 0) prev_rows[t] -= back;
}

// One thread per token; prev_rows[t] < 0 keeps the staged token.
__global__ void update_input_ids_kernel(int64_t* input_ids, const int64_t* __restrict__ prev_rows,
                                        const int64_t* __restrict__ prev_sampled, int64_t num_tokens) {
  int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_tokens) return;
  int64_t p = prev_rows[t];
  if (p >= 0) input_ids[t] = prev_sampled[p];
}

// One thread per step row, in the precedence of stages/request.py
// token_stop_reason: a stop id first (the slot's first num_eos ids are eos
// ids: EOS, the rest: STOP; the table is padded with -1, never a token), then
// the length limit on the row's output count (out_index + 1 after this token).
__global__ void stop_flags_kernel(const int64_t* __restrict__ sampled, const int64_t* __restrict__ row_slots,
                                  const int64_t* __restrict__ sample_mask, const int64_t* __restrict__ out_index,
                                  const int64_t* __restrict__ stop_ids, int64_t width,
                                  const int64_t* __restrict__ num_eos, const int64_t* __restrict__ max_outputs,
                                  int64_t* __restrict__ finish, int64_t rows) {
  int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  int64_t code = 0;
  if (sample_mask[r] > 0) {
    int64_t slot = row_slots[r];
    int64_t token = sampled[r];
    const int64_t* ids = stop_ids + slot * width;
    for (int64_t j = 0; j < width; ++j) {
      if (ids[j] == token) {
        code = j < num_eos[slot] ? kFinishEos : kFinishStop;
        break;
      }
    }
    if (code == 0 && out_index[r] + 1 >= max_outputs[slot]) code = kFinishLength;
  }
  finish[r] = code;
}

void build_sampling_params(uintptr_t temperature, uintptr_t top_p, uintptr_t top_k, uintptr_t seed_state,
                           uintptr_t row_slots, uintptr_t sample_mask, uintptr_t column, uintptr_t out_temperature,
                           uintptr_t out_top_p, uintptr_t out_top_k, uintptr_t out_seed_state, uintptr_t out_uniform,
                           int64_t rows, bool advance, uintptr_t stream) {
  check_rows(rows, "build_sampling_params");
  if (rows == 0) return;
  build_sampling_params_kernel<<<blocks_for(rows), kThreads, 0, as_stream(stream)>>>(
      ptr<const float>(temperature), ptr<const float>(top_p), ptr<const int64_t>(top_k), ptr<int64_t>(seed_state),
      ptr<const int64_t>(row_slots), ptr<const int64_t>(sample_mask), ptr<const int64_t>(column),
      ptr<float>(out_temperature), ptr<float>(out_top_p), ptr<int64_t>(out_top_k), ptr<int64_t>(out_seed_state),
      ptr<float>(out_uniform), rows, advance);
  check_launch("build_sampling_params");
}

void settle_verified_rows(uintptr_t seed_state, uintptr_t lag, uintptr_t row_slots, uintptr_t column, uintptr_t drew,
                          int64_t rows, bool advance, uintptr_t stream) {
  check_rows(rows, "settle_verified_rows");
  if (rows == 0) return;
  settle_verified_rows_kernel<<<blocks_for(rows), kThreads, 0, as_stream(stream)>>>(
      ptr<int64_t>(seed_state), ptr<int64_t>(lag), ptr<const int64_t>(row_slots), ptr<const int64_t>(column),
      ptr<const int64_t>(drew), rows, advance);
  check_launch("settle_verified_rows");
}

void apply_lag(uintptr_t start_pos, uintptr_t seq_lens, uintptr_t out_index, uintptr_t prev_rows,
               uintptr_t query_start_loc, uintptr_t row_slots, uintptr_t lagged, uintptr_t lag, int64_t rows,
               uintptr_t stream) {
  check_rows(rows, "apply_lag");
  if (rows == 0) return;
  apply_lag_kernel<<<blocks_for(rows), kThreads, 0, as_stream(stream)>>>(
      ptr<int64_t>(start_pos), ptr<int64_t>(seq_lens), ptr<int64_t>(out_index), ptr<int64_t>(prev_rows),
      ptr<const int64_t>(query_start_loc), ptr<const int64_t>(row_slots), ptr<const int64_t>(lagged),
      ptr<const int64_t>(lag), rows);
  check_launch("apply_lag");
}

void update_input_ids(uintptr_t input_ids, uintptr_t prev_rows, uintptr_t prev_sampled, int64_t num_tokens,
                      uintptr_t stream) {
  check_rows(num_tokens, "update_input_ids");
  if (num_tokens == 0) return;
  update_input_ids_kernel<<<blocks_for(num_tokens), kThreads, 0, as_stream(stream)>>>(
      ptr<int64_t>(input_ids), ptr<const int64_t>(prev_rows), ptr<const int64_t>(prev_sampled), num_tokens);
  check_launch("update_input_ids");
}

void stop_flags(uintptr_t sampled, uintptr_t row_slots, uintptr_t sample_mask, uintptr_t out_index,
                uintptr_t stop_ids, int64_t width, uintptr_t num_eos, uintptr_t max_outputs, uintptr_t finish,
                int64_t rows, uintptr_t stream) {
  check_rows(rows, "stop_flags");
  if (width < 0) throw std::invalid_argument("stop_flags: width must be >= 0");
  if (rows == 0) return;
  stop_flags_kernel<<<blocks_for(rows), kThreads, 0, as_stream(stream)>>>(
      ptr<const int64_t>(sampled), ptr<const int64_t>(row_slots), ptr<const int64_t>(sample_mask),
      ptr<const int64_t>(out_index), ptr<const int64_t>(stop_ids), width, ptr<const int64_t>(num_eos),
      ptr<const int64_t>(max_outputs), ptr<int64_t>(finish), rows);
  check_launch("stop_flags");
}

}  // namespace

// Called from cuda_handoff.cpp's PYBIND11_MODULE.
void register_step_kernels(py::module_& m) {
  m.def("build_sampling_params", &build_sampling_params, py::arg("temperature"), py::arg("top_p"), py::arg("top_k"),
        py::arg("seed_state"), py::arg("row_slots"), py::arg("sample_mask"), py::arg("column"),
        py::arg("out_temperature"), py::arg("out_top_p"), py::arg("out_top_k"), py::arg("out_seed_state"),
        py::arg("out_uniform"), py::arg("rows"), py::arg("advance"), py::arg("stream"),
        "Gather each step row's sampling parameters by slot (the seed state moved column[r] outputs on where "
        "column[r] > 0), compute its uniform, and (advance) move the seed state of plain rows (column < 0) "
        "with sample_mask > 0 on, in place. float32: temperature, top_p, out_temperature, out_top_p, "
        "out_uniform; the rest int64");
  m.def("settle_verified_rows", &settle_verified_rows, py::arg("seed_state"), py::arg("lag"), py::arg("row_slots"),
        py::arg("column"), py::arg("drew"), py::arg("rows"), py::arg("advance"), py::arg("stream"),
        "For each verify row (its column-0 step row): emitted = 1 + its leading later columns whose previous "
        "column drew its draft (drew == 1); (advance) its slot's seed state moves on by emitted; its slot's "
        "lag = its columns - emitted. int64 arrays");
  m.def("apply_lag", &apply_lag, py::arg("start_pos"), py::arg("seq_lens"), py::arg("out_index"),
        py::arg("prev_rows"), py::arg("query_start_loc"), py::arg("row_slots"), py::arg("lagged"), py::arg("lag"),
        py::arg("rows"), py::arg("stream"),
        "Rows with lagged != 0 move start_pos, seq_lens, out_index and their first token's prev_rows entry "
        "(where >= 0) back by lag[row_slots[r]]. int64 arrays");
  m.def("update_input_ids", &update_input_ids, py::arg("input_ids"), py::arg("prev_rows"), py::arg("prev_sampled"),
        py::arg("num_tokens"), py::arg("stream"),
        "input_ids[t] = prev_sampled[prev_rows[t]] where prev_rows[t] >= 0 (int64 arrays)");
  m.def("stop_flags", &stop_flags, py::arg("sampled"), py::arg("row_slots"), py::arg("sample_mask"),
        py::arg("out_index"), py::arg("stop_ids"), py::arg("width"), py::arg("num_eos"), py::arg("max_outputs"),
        py::arg("finish"), py::arg("rows"), py::arg("stream"),
        "finish[r] = the token-level FinishReason code of row r (0: running; rows with sample_mask 0 get 0)");
}
