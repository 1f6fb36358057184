// cuda_handoff.cpp - overlapd.kernels._cuda: the GPU side of the step handoff.
//
// Built only with -DOVERLAPD_CUDA=ON (env OVERLAPD_CUDA=1) where the CUDA
// toolkit is found; the Python face (kernels/cuda_handoff.py) falls back to
// plain host memory when this module or a device is missing.
//
// Everything runs on a raw cudaStream_t handed in as an integer (Torch's
// torch.cuda.current_stream().cuda_stream, Paddle's equivalent), so both
// frameworks share one mechanism. No call here synchronizes with the device
// except Event.synchronize, which releases the GIL.
//
// The completion signal: cudaLaunchHostFunc queues a host function behind the
// step's work on the stream; the driver's callback thread runs it once every
// earlier operation (the device-to-host copies included) has finished, and it
// only adds 1 to an eventfd (no CUDA call is allowed there, and no Python runs),
// which wakes the asyncio loop through add_reader. SpinWaiter is the
// latency-mode alternative (a native thread polling an event); bench/gpu.py
// measures both.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <immintrin.h>

#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

// The per-step device kernels (step_kernels.cu) register themselves here.
void register_step_kernels(py::module_& m);

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Runs on the driver's callback thread. eventfd_write is async-signal-safe and
// never blocks short of 2^64-1 pending counts.
void CUDART_CB write_eventfd(void* user) {
  int fd = static_cast<int>(reinterpret_cast<intptr_t>(user));
  uint64_t one = 1;
  ssize_t rc;
  do {
    rc = ::write(fd, &one, sizeof one);
  } while (rc < 0 && errno == EINTR);
}

// A bounded pool of page-locked buffers of one size. Device-to-host copies
// land here; the bound is the number of steps whose outputs may be in flight.
class PinnedPool {
 public:
  PinnedPool(size_t slot_bytes, size_t slots) : slot_bytes_(slot_bytes) {
    if (slot_bytes == 0 || slots == 0) throw std::invalid_argument("slot_bytes and slots must be > 0");
    for (size_t i = 0; i < slots; ++i) {
      void* p = nullptr;
      cudaError_t err = cudaHostAlloc(&p, slot_bytes, cudaHostAllocDefault);
      if (err != cudaSuccess) {
        free_all();
        check(err, "cudaHostAlloc");
      }
      bufs_.push_back(p);
      free_.push_back(i);
    }
  }
  ~PinnedPool() { free_all(); }
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  size_t acquire() {
    std::lock_guard<std::mutex> g(mu_);
    if (free_.empty()) {
      throw std::runtime_error("pinned pool exhausted: " + std::to_string(bufs_.size()) +
                               " buffers in flight (collect a step before launching another)");
    }
    size_t i = free_.back();
    free_.pop_back();
    return i;
  }
  void release(size_t i) {
    std::lock_guard<std::mutex> g(mu_);
    if (i >= bufs_.size()) throw std::out_of_range("no such pinned buffer");
    for (size_t f : free_)
      if (f == i) throw std::runtime_error("pinned buffer released twice");
    free_.push_back(i);
  }
  uintptr_t ptr(size_t i) const {
    if (i >= bufs_.size()) throw std::out_of_range("no such pinned buffer");
    return reinterpret_cast<uintptr_t>(bufs_[i]);
  }
  size_t available() {
    std::lock_guard<std::mutex> g(mu_);
    return free_.size();
  }
  size_t slot_bytes() const { return slot_bytes_; }
  size_t slots() const { return bufs_.size(); }

  // A writable memoryview over buffer i (the pool must outlive it: Python's
  // wrapper keeps the pool referenced from every view it hands out).
  py::memoryview view(size_t i, size_t nbytes) {
    if (nbytes > slot_bytes_) throw std::out_of_range("view larger than a pinned buffer");
    return py::memoryview::from_memory(reinterpret_cast<void*>(ptr(i)), static_cast<ssize_t>(nbytes));
  }

 private:
  void free_all() {
    for (void* p : bufs_) cudaFreeHost(p);
    bufs_.clear();
    free_.clear();
  }
  size_t slot_bytes_;
  std::vector<void*> bufs_;
  std::vector<size_t> free_;
  std::mutex mu_;
};

class Event {
 public:
  explicit Event(bool timing) {
    check(cudaEventCreateWithFlags(&ev_, timing ? cudaEventDefault : cudaEventDisableTiming), "cudaEventCreate");
  }
  ~Event() { cudaEventDestroy(ev_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(uintptr_t stream) { check(cudaEventRecord(ev_, as_stream(stream)), "cudaEventRecord"); }
  bool query() {
    cudaError_t err = cudaEventQuery(ev_);
    if (err == cudaErrorNotReady) return false;
    check(err, "cudaEventQuery");
    return true;
  }
  void synchronize() {
    cudaError_t err;
    {
      py::gil_scoped_release nogil;
      err = cudaEventSynchronize(ev_);
    }
    check(err, "cudaEventSynchronize");
  }
  float elapsed_ms(const Event& since) const {
    float ms = 0;
    check(cudaEventElapsedTime(&ms, since.ev_, ev_), "cudaEventElapsedTime");
    return ms;
  }

 private:
  cudaEvent_t ev_{};
};

// The latency-mode alternative to the host function: one native thread (no
// GIL, no Python) takes events in launch order and spins on cudaEventQuery
// until each completes, then writes the eventfd. It sleeps on a condition
// variable while nothing is in flight, and burns a core while steps are.
class SpinWaiter {
 public:
  explicit SpinWaiter(int fd) : fd_(fd) {
    if (fd < 0) throw std::invalid_argument("SpinWaiter needs an open eventfd");
    check(cudaGetDevice(&device_), "cudaGetDevice");
    thread_ = std::thread([this] { loop(); });
  }
  ~SpinWaiter() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();  // finishes (and signals) what was queued
  }
  SpinWaiter(const SpinWaiter&) = delete;
  SpinWaiter& operator=(const SpinWaiter&) = delete;

  // Record an event behind the stream's work; the eventfd gets 1 once it completes.
  void watch(uintptr_t stream) {
    cudaEvent_t ev;
    check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    cudaError_t err = cudaEventRecord(ev, as_stream(stream));
    if (err != cudaSuccess) {
      cudaEventDestroy(ev);
      check(err, "cudaEventRecord");
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      queue_.push_back(ev);
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    cudaSetDevice(device_);
    for (;;) {
      cudaEvent_t ev;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        ev = queue_.front();
        queue_.pop_front();
      }
      while (cudaEventQuery(ev) == cudaErrorNotReady) _mm_pause();
      cudaEventDestroy(ev);
      write_eventfd(reinterpret_cast<void*>(static_cast<intptr_t>(fd_)));
    }
  }
  int fd_;
  int device_ = 0;
  bool stop_ = false;
  std::deque<cudaEvent_t> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;  // last: starts after every member above exists
};

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky-free error, report none
    return 0;
  }
  return n;
}

void memcpy_d2h_async(uintptr_t dst, uintptr_t src, size_t nbytes, uintptr_t stream) {
  check(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                        cudaMemcpyDeviceToHost, as_stream(stream)),
        "cudaMemcpyAsync");
}

void signal_eventfd(uintptr_t stream, int fd) {
  if (fd < 0) throw std::invalid_argument("signal_eventfd needs an open eventfd");
  check(cudaLaunchHostFunc(as_stream(stream), write_eventfd, reinterpret_cast<void*>(static_cast<intptr_t>(fd))),
        "cudaLaunchHostFunc");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "Pinned buffers, async copies, events and an eventfd host callback on a raw CUDA stream";
  m.def("device_count", &device_count, "CUDA devices visible (0 without a driver)");
  m.def("memcpy_d2h_async", &memcpy_d2h_async, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream"),
        "cudaMemcpyAsync device->host on the given raw stream (dst should be pinned)");
  m.def("signal_eventfd", &signal_eventfd, py::arg("stream"), py::arg("fd"),
        "Queue a host function that adds 1 to eventfd `fd` once the stream's earlier work is done");
  py::class_<PinnedPool>(m, "PinnedPool")
      .def(py::init<size_t, size_t>(), py::arg("slot_bytes"), py::arg("slots"))
      .def("acquire", &PinnedPool::acquire)
      .def("release", &PinnedPool::release)
      .def("ptr", &PinnedPool::ptr)
      .def("view", &PinnedPool::view, py::keep_alive<0, 1>())
      .def_property_readonly("available", &PinnedPool::available)
      .def_property_readonly("slot_bytes", &PinnedPool::slot_bytes)
      .def_property_readonly("slots", &PinnedPool::slots);
  py::class_<SpinWaiter>(m, "SpinWaiter")
      .def(py::init<int>(), py::arg("fd"))
      .def("watch", &SpinWaiter::watch, py::arg("stream"));
  py::class_<Event>(m, "Event")
      .def(py::init<bool>(), py::arg("timing") = false)
      .def("record", &Event::record, py::arg("stream"))
      .def("query", &Event::query)
      .def("synchronize", &Event::synchronize)
      .def("elapsed_ms", &Event::elapsed_ms, py::arg("since"));
  register_step_kernels(m);
}
