// module.cpp - Python bindings (overlapd.kernels._native). Bindings only:
// the ring lives in overlapd/ring.h, ring_writer.*, ring_reader.*.
//
// Each Python object guards its C++ object with a mutex taken with the GIL
// released, so a call that blocks without the GIL (next, bench_*) cannot
// race another thread's call or close(), and cannot deadlock with it.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <mutex>
#include <cstring>
#include <stdexcept>
#include <string>

#include "overlapd/ring.h"
#include "ring_reader.hpp"
#include "ring_writer.hpp"

namespace py = pybind11;
using overlapd::Mapping;
using overlapd::RingError;

namespace {

std::unique_lock<std::mutex> lock_released(std::mutex& mu) {
  std::unique_lock<std::mutex> lock(mu, std::try_to_lock);
  if (!lock.owns_lock()) {
    py::gil_scoped_release nogil;
    lock.lock();
  }
  return lock;
}

// The writable bytes of an open reservation. A memoryview of it keeps the
// mapping alive, so a view kept past close() is stale but never dangling.
struct ReservedView {
  std::shared_ptr<Mapping> keep;
  uint8_t* ptr;
  size_t len;
};

struct PyWriter {
  std::mutex mu;
  std::unique_ptr<overlapd::RingWriter> w;
};

struct PyReader {
  std::mutex mu;
  std::unique_ptr<overlapd::RingReader> r;
  overlapd::RingReader& get() {
    if (!r || !r->is_open()) throw py::value_error("ring reader is closed");
    return *r;
  }
};

// Python-side buffer of a bytes-like object, released on scope exit.
struct ByteView {
  Py_buffer view{};
  explicit ByteView(py::handle obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~ByteView() { PyBuffer_Release(&view); }
};

py::tuple event_tuple(const ovl_event& ev, const uint8_t* body) {
  switch (ev.kind) {
    case OVL_EV_RECORD:
      return py::make_tuple("record", ev.seq, ev.publish_ns, ev.type,
                            py::bytes(reinterpret_cast<const char*>(body), ev.length));
    case OVL_EV_LOST: return py::make_tuple("lost", ev.first, ev.last);
    case OVL_EV_EPOCH: return py::make_tuple("epoch", ev.epoch);
    case OVL_EV_PRODUCER_GONE: return py::make_tuple("gone");
    case OVL_EV_CLOSED: return py::make_tuple("closed");
    case OVL_EV_TIMEOUT: return py::make_tuple("timeout");
    default: throw RingError(0, ovl_strerror(ev.kind));
  }
}

py::object reader_next(PyReader& self, int timeout_ms) {
  auto lock = lock_released(self.mu);
  auto& r = self.get();
  // Wait in slices so Ctrl-C (and other signals) are handled promptly.
  const int64_t deadline = timeout_ms < 0 ? INT64_MAX : ovl_now_ns() + int64_t(timeout_ms) * 1000000;
  ovl_event ev{};
  for (;;) {
    const int64_t now = ovl_now_ns();
    int slice = 200;
    if (timeout_ms >= 0) slice = int(std::min<int64_t>(200, std::max<int64_t>(0, (deadline - now) / 1000000)));
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = r.next(slice, &ev);
    }
    if (rc != OVL_EV_TIMEOUT || ovl_now_ns() >= deadline) break;
    if (__atomic_load_n(&r.raw().interrupt, __ATOMIC_ACQUIRE)) break;  // close() from another thread
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
  return event_tuple(ev, r.body());
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "overlapd native kernels: the shared-memory ring (SPEC.md section 1)";
  m.attr("HAS_CUDA") = false;
  py::register_exception<RingError>(m, "RingError", PyExc_OSError);

  m.attr("HEADER_SIZE") = OVL_HEADER_SIZE;
  m.attr("RECORD_HEADER_SIZE") = OVL_REC_HEADER;
  m.attr("TYPE_PAD") = OVL_TYPE_PAD;
  m.attr("TYPE_STEP") = OVL_TYPE_STEP;
  m.attr("MIN_CAPACITY") = OVL_MIN_CAPACITY;
  m.def("bench_word", &overlapd::RingWriter::bench_word, py::arg("seq"), py::arg("index"),
        "The u64 that bench_publish writes at word `index` of record `seq`'s body.");

  py::class_<ReservedView>(m, "_ReservedView", py::buffer_protocol())
      .def_buffer([](ReservedView& v) {
        return py::buffer_info(v.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(v.len)}, {py::ssize_t(1)}, false);
      });

  py::class_<PyWriter>(m, "RingWriter", "The producer of a shared-memory ring (one per ring file).")
      .def(py::init([](const std::string& path, uint64_t capacity, uint32_t max_slots, uint32_t vocab_size,
                       const std::string& model_name, uint32_t mode, bool backpressure) {
             auto self = std::make_unique<PyWriter>();
             self->w = std::make_unique<overlapd::RingWriter>(path, capacity, max_slots, vocab_size,
                                                              model_name, mode, backpressure);
             return self;
           }),
           py::arg("path"), py::arg("capacity"), py::arg("max_slots") = 256, py::arg("vocab_size") = 0,
           py::arg("model_name") = "", py::arg("mode") = 0640, py::arg("backpressure") = false)
      .def_property_readonly("path", [](PyWriter& s) { return s.w->path(); })
      .def_property_readonly("capacity", [](PyWriter& s) { return s.w->capacity(); })
      .def_property_readonly("epoch", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->epoch(); })
      .def_property_readonly("head", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->head(); })
      .def_property_readonly("tail", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->tail(); })
      .def_property_readonly("next_seq", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->next_seq(); })
      .def_property_readonly("max_record_bytes", [](PyWriter& s) { return s.w->max_record_bytes(); })
      .def_property_readonly("closed", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->closed(); })
      .def("try_reserve",
           [](PyWriter& s, size_t body_len) -> py::object {
             auto l = lock_released(s.mu);
             uint8_t* p = s.w->try_reserve(body_len);
             if (!p) return py::none();
             ReservedView v{s.w->mapping(), p, size_t(ovl_align8(body_len))};
             return py::memoryview(py::cast(std::move(v)));
           },
           py::arg("body_len"),
           "Writable view of the next STEP record's body (align8(body_len) bytes), or None while "
           "backpressure blocks. Valid until commit()/cancel().")
      .def("commit", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->commit(); },
           "Publishes the open reservation; returns its seq.")
      .def("cancel", [](PyWriter& s) { auto l = lock_released(s.mu); s.w->cancel(); },
           "Drops the open reservation unpublished.")
      .def("publish",
           [](PyWriter& s, py::handle body) {
             ByteView b(body);
             auto l = lock_released(s.mu);
             return s.w->publish(b.view.buf, size_t(b.view.len));
           },
           py::arg("body"), "reserve + copy + commit: the seq, or -1 while backpressure blocks.")
      .def("heartbeat", [](PyWriter& s) { auto l = lock_released(s.mu); s.w->heartbeat(); })
      .def("evict_dead_readers", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->evict_dead_readers(); })
      .def("readers_evicted", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->readers_evicted(); },
           "Dead readers' slots freed so far, by evict_dead_readers or while publishing.")
      .def("active_readers", [](PyWriter& s) { auto l = lock_released(s.mu); return s.w->active_readers(); })
      .def("close", [](PyWriter& s, bool clean) { auto l = lock_released(s.mu); s.w->close(clean); },
           py::arg("clean") = true)
      .def("bench_publish",
           [](PyWriter& s, uint64_t count, size_t body_len, uint64_t interval_ns, uint64_t stop_after_ns) {
             auto l = lock_released(s.mu);
             py::gil_scoped_release nogil;
             return s.w->bench_publish(count, body_len, interval_ns, stop_after_ns);
           },
           py::arg("count"), py::arg("body_len"), py::arg("interval_ns") = 0, py::arg("stop_after_ns") = 0)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyWriter& s, py::args) { auto l = lock_released(s.mu); s.w->close(true); });

  py::class_<PyReader>(m, "RingReader", "A reader of a shared-memory ring (SPEC.md 1.4).")
      .def(py::init([](const std::string& path, bool from_head, bool backpressure, int64_t stale_after_ms,
                       bool strict_readonly, int64_t spin_ns) {
             int flags = (from_head ? OVL_FROM_HEAD : 0) | (backpressure ? OVL_BACKPRESSURE : 0) |
                         (strict_readonly ? OVL_STRICT_RDONLY : 0);
             auto self = std::make_unique<PyReader>();
             py::gil_scoped_release nogil;  // opening may wait briefly for an initialising producer
             self->r = std::make_unique<overlapd::RingReader>(path, flags, stale_after_ms, spin_ns);
             return self;
           }),
           py::arg("path"), py::arg("from_head") = false, py::arg("backpressure") = false,
           py::arg("stale_after_ms") = 3000, py::arg("strict_readonly") = false, py::arg("spin_ns") = OVL_SPIN_NS)
      .def("next", &reader_next, py::arg("timeout_ms") = -1,
           "Next event: ('record', seq, publish_ns, rtype, body) | ('lost', first, last) | "
           "('epoch', epoch) | ('gone',) | ('closed',) | ('timeout',).")
      .def("close",
           [](PyReader& s) {
             if (s.r) s.r->interrupt();
             auto l = lock_released(s.mu);
             if (s.r) s.r->close();
           })
      .def_property_readonly("epoch", [](PyReader& s) { auto l = lock_released(s.mu); return s.get().raw().epoch; })
      .def_property_readonly("capacity", [](PyReader& s) { auto l = lock_released(s.mu); return s.get().raw().capacity; })
      .def_property_readonly("cursor", [](PyReader& s) { auto l = lock_released(s.mu); return s.get().raw().cursor; })
      .def_property_readonly("head", [](PyReader& s) { auto l = lock_released(s.mu); return ovl_reader_head(&s.get().raw()); })
      .def_property_readonly("tail", [](PyReader& s) { auto l = lock_released(s.mu); return ovl_reader_tail(&s.get().raw()); })
      .def_property_readonly("max_slots", [](PyReader& s) { auto l = lock_released(s.mu); return ovl_reader_max_slots(&s.get().raw()); })
      .def_property_readonly("vocab_size", [](PyReader& s) { auto l = lock_released(s.mu); return ovl_reader_vocab_size(&s.get().raw()); })
      .def_property_readonly("model_name",
                             [](PyReader& s) {
                               auto l = lock_released(s.mu);
                               char name[OVL_MODEL_NAME_LEN];
                               ovl_reader_model_name(&s.get().raw(), name, sizeof name);
                               PyObject* o = PyUnicode_DecodeUTF8(name, Py_ssize_t(strlen(name)), "replace");
                               if (!o) throw py::error_already_set();
                               return py::reinterpret_steal<py::str>(o);
                             })
      .def_property_readonly("producer_pid", [](PyReader& s) { auto l = lock_released(s.mu); return ovl_reader_pid(&s.get().raw()); })
      .def_property_readonly("lost_total", [](PyReader& s) { auto l = lock_released(s.mu); return s.get().raw().lost_total; })
      .def_property_readonly("closed_cleanly",
                             [](PyReader& s) {
                               auto l = lock_released(s.mu);
                               return (ovl_reader_flags(&s.get().raw()) & OVL_FLAG_CLOSED) != 0;
                             })
      .def_property_readonly("heartbeat_age_ns",
                             [](PyReader& s) {
                               auto l = lock_released(s.mu);
                               return ovl_now_ns() - int64_t(ovl_reader_heartbeat_ns(&s.get().raw()));
                             })
      .def("bench_consume",
           [](PyReader& s, uint64_t count, int timeout_ms, bool verify) {
             auto l = lock_released(s.mu);
             auto& r = s.get();
             overlapd::RingReader::BenchResult res;
             {
               py::gil_scoped_release nogil;
               res = r.bench_consume(count, timeout_ms, verify);
             }
             py::array_t<int64_t> lat(py::ssize_t(res.latency_ns.size()));
             if (!res.latency_ns.empty())
               std::memcpy(lat.mutable_data(), res.latency_ns.data(), res.latency_ns.size() * sizeof(int64_t));
             py::dict d;
             d["received"] = res.received;
             d["lost"] = res.lost;
             d["torn"] = res.torn;
             d["latency_ns"] = lat;
             d["epochs"] = res.epochs;
             d["closed"] = res.closed;
             d["gone"] = res.gone;
             d["elapsed_ns"] = res.last_ns - res.first_ns;  // first to last receipt
             return d;
           },
           py::arg("count"), py::arg("timeout_ms"), py::arg("verify") = true)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyReader& s, py::args) {
        if (s.r) s.r->interrupt();
        auto l = lock_released(s.mu);
        if (s.r) s.r->close();
      });
}
