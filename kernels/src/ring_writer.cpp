// ring_writer.cpp - the producer side of the shared-memory ring (SPEC.md 1).
//
// Write path, per record (no locks, one producer):
//   1. pick the position; if the record would run past the end of the data
//      region, a PAD fills the rest first (records never wrap);
//   2. backpressure: refuse ("would block") if an active reader slot has not
//      consumed the bytes about to be overwritten;
//   3. advance head past every record those bytes belong to;
//   4. store tail_intent, store-store fence, write the bytes;
//   5. store tail (release), bump notify, futex-wake only if someone waits.
// Readers copy a record, fence, and re-read tail_intent: if it ran more
// than a capacity past the record, the copy may be torn and is dropped.
#include "ring_writer.hpp"

#include "overlapd/ring.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <climits>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

namespace overlapd {

namespace {

constexpr uint64_t kHeader = OVL_HEADER_SIZE;
constexpr int64_t kForeignStaleNs = 3'000'000'000;  // matches the readers' default

int64_t now_ns() { return ovl_now_ns(); }

uint64_t* u64(uint8_t* base, size_t off) { return reinterpret_cast<uint64_t*>(base + off); }
uint32_t* u32(uint8_t* base, size_t off) { return reinterpret_cast<uint32_t*>(base + off); }

std::string errno_text(const std::string& what, int e) { return what + ": " + std::strerror(e); }

uint64_t random_nonzero_u64() {
  uint64_t v = 0;
  while (v == 0) {
    ssize_t n = getrandom(&v, sizeof v, 0);
    if (n != static_cast<ssize_t>(sizeof v)) {
      if (n < 0 && errno == EINTR) continue;
      throw RingError(errno, errno_text("getrandom failed while choosing the ring epoch", errno));
    }
  }
  return v;
}

bool process_alive(uint32_t pid) {
  if (pid == 0) return false;
  if (kill(static_cast<pid_t>(pid), 0) == 0) return true;
  return errno != ESRCH;  // EPERM: it exists, we just may not signal it
}

// Rings open for writing in this process, by (dev, ino): a second writer on
// the same file would interleave records and corrupt it.
std::mutex g_open_mu;
std::set<std::pair<uint64_t, uint64_t>> g_open;

// Bytes of the header that are neither fields nor the futex words or reader
// slots: the reserved field and the padding that keeps hot fields on their
// own cache lines. Zeroed on (re)initialisation.
constexpr std::pair<size_t, size_t> kZeroRanges[] = {
    {OVL_OFF_RESERVED, OVL_OFF_TAIL},       {OVL_OFF_TAIL + 8, OVL_OFF_TAIL_INTENT},
    {OVL_OFF_TAIL_INTENT + 8, OVL_OFF_HEAD}, {OVL_OFF_HEAD + 8, OVL_OFF_NOTIFY},
    {OVL_OFF_WAITERS + 4, OVL_OFF_HEARTBEAT}, {OVL_OFF_HEARTBEAT + 8, OVL_OFF_MODEL_NAME},
    {OVL_OFF_MODEL_NAME + OVL_MODEL_NAME_LEN, OVL_OFF_SLOTS},
};

}  // namespace

Mapping::~Mapping() {
  if (base) munmap(base, len);
}

RingWriter::RingWriter(const std::string& path, uint64_t capacity, uint32_t max_slots,
                       uint32_t vocab_size, const std::string& model_name, uint32_t mode,
                       bool backpressure)
    : path_(path),
      model_name_(model_name),
      capacity_(capacity),
      max_slots_(max_slots),
      vocab_size_(vocab_size),
      backpressure_(backpressure) {
  if (path.empty()) throw std::invalid_argument("ring path is empty");
  if (path.size() >= OVL_PATH_MAX - 64) throw std::invalid_argument("ring path is too long");
  if (capacity < OVL_MIN_CAPACITY || (capacity & (capacity - 1)) || capacity > OVL_MAX_CAPACITY)
    throw std::invalid_argument("ring capacity must be a power of two between 65536 and 2^40 (got " +
                                std::to_string(capacity) + ")");
  if (model_name.size() >= OVL_MODEL_NAME_LEN)
    throw std::invalid_argument("model name is " + std::to_string(model_name.size()) +
                                " bytes of UTF-8; the ring holds at most 255");
  if (model_name.find('\0') != std::string::npos)
    throw std::invalid_argument("model name contains a NUL byte");
  if (mode & ~07777u) throw std::invalid_argument("mode must be permission bits (e.g. 0o640)");
  // Half the data region: a record plus the PAD before it (shorter than the
  // record) then always fits, and head never has to pass tail.
  max_record_ = std::min<uint64_t>(capacity / 2, 0xFFFFFFF8u);
  epoch_ = random_nonzero_u64();

  const uint64_t size = kHeader + capacity_;
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
  if (fd < 0 && errno != ENOENT) {
    int e = errno;
    if (e == ELOOP) throw RingError(e, path + ": is a symbolic link; give the ring's real path");
    if (e == EISDIR) throw RingError(e, path + ": is a directory");
    throw RingError(e, errno_text(path + ": cannot open for writing", e));
  }
  if (fd >= 0) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw RingError(EINVAL, path + ": exists and is not a regular file");
    }
    // Refuse to take over a ring another producer is still writing.
    {
      std::lock_guard<std::mutex> lock(g_open_mu);
      if (g_open.count({static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)})) {
        ::close(fd);
        throw RingError(EBUSY, path + ": another RingWriter in this process has it open; close it first");
      }
    }
    uint8_t hdr[OVL_OFF_HEARTBEAT + 8];
    if (pread(fd, hdr, sizeof hdr, 0) == static_cast<ssize_t>(sizeof hdr) &&
        std::memcmp(hdr, OVL_MAGIC, OVL_MAGIC_LEN) == 0) {
      uint32_t pid, flags;
      uint64_t hb;
      std::memcpy(&pid, hdr + OVL_OFF_PID, 4);
      std::memcpy(&flags, hdr + OVL_OFF_FLAGS, 4);
      std::memcpy(&hb, hdr + OVL_OFF_HEARTBEAT, 8);
      if (!(flags & OVL_FLAG_CLOSED) && pid != static_cast<uint32_t>(getpid()) &&
          process_alive(pid) && now_ns() - static_cast<int64_t>(hb) < kForeignStaleNs) {
        ::close(fd);
        throw RingError(EBUSY, path + ": owned by a live producer (pid " + std::to_string(pid) +
                                       "); stop it before starting another");
      }
    }
    if (static_cast<uint64_t>(st.st_size) == size) {
      // Same size: re-initialise in place so readers that have it mapped
      // see the epoch change. Never shrink a mapped file (SIGBUS).
      if (fchmod(fd, mode) != 0 && errno != EPERM) {
        int e = errno;
        ::close(fd);
        throw RingError(e, errno_text(path + ": fchmod failed", e));
      }
      try {
        reinit_in_place(fd);
      } catch (...) {
        ::close(fd);
        throw;
      }
      dev_ = static_cast<uint64_t>(st.st_dev);
      ino_ = static_cast<uint64_t>(st.st_ino);
      ::close(fd);
    } else {
      ::close(fd);
      create_new_file(mode);
    }
  } else {
    create_new_file(mode);
  }
  std::lock_guard<std::mutex> lock(g_open_mu);
  g_open.insert({dev_, ino_});
}

RingWriter::~RingWriter() {
  try {
    close(true);
  } catch (...) {
  }
}

// A fresh file is built under a temporary name and renamed into place, so a
// reader never maps a half-written header, and readers of the old file keep
// a valid mapping (they notice the new inode and switch).
void RingWriter::create_new_file(uint32_t mode) {
  const uint64_t size = kHeader + capacity_;
  char suffix[64];
  std::snprintf(suffix, sizeof suffix, ".tmp.%d.%016llx", static_cast<int>(getpid()),
                static_cast<unsigned long long>(random_nonzero_u64()));
  const std::string tmp = path_ + suffix;
  int fd = open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw RingError(errno, errno_text(path_ + ": cannot create the ring file", errno));
  auto fail = [&](const std::string& what) {
    int e = errno;
    ::close(fd);
    unlink(tmp.c_str());
    throw RingError(e, errno_text(path_ + ": " + what, e));
  };
  if (fchmod(fd, mode) != 0) fail("fchmod failed");  // exact mode, whatever the umask
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) fail("cannot size the ring file");
  // Reserve the pages now: on a full tmpfs a later page fault would SIGBUS.
  int fa = posix_fallocate(fd, 0, static_cast<off_t>(size));
  if (fa == ENOSPC) {
    errno = fa;
    fail("no space for the ring");
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) fail("cannot map the ring file");
  map_ = std::make_shared<Mapping>(static_cast<uint8_t*>(p), size);
  base_ = map_->base;
  write_header(base_, false);
  __atomic_store_n(u64(base_, OVL_OFF_EPOCH), epoch_, __ATOMIC_RELEASE);
  struct stat st;
  if (fstat(fd, &st) != 0) fail("cannot stat the ring file");
  if (rename(tmp.c_str(), path_.c_str()) != 0) {
    map_.reset();
    base_ = nullptr;
    fail("cannot move the ring file into place");
  }
  dev_ = static_cast<uint64_t>(st.st_dev);
  ino_ = static_cast<uint64_t>(st.st_ino);
  ::close(fd);
}

void RingWriter::reinit_in_place(int fd) {
  const uint64_t size = kHeader + capacity_;
  int fa = posix_fallocate(fd, 0, static_cast<off_t>(size));
  if (fa == ENOSPC) throw RingError(fa, path_ + ": no space for the ring");
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw RingError(errno, errno_text(path_ + ": cannot map the ring file", errno));
  map_ = std::make_shared<Mapping>(static_cast<uint8_t*>(p), size);
  base_ = map_->base;
  // Epoch 0 first: a reader that copies bytes we write from here on sees a
  // changed epoch after its fence and drops the copy; one that sees the new
  // epoch (stored last, release) sees positions already reset.
  __atomic_store_n(u64(base_, OVL_OFF_EPOCH), 0ull, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  write_header(base_, true);
  __atomic_store_n(u64(base_, OVL_OFF_EPOCH), epoch_, __ATOMIC_RELEASE);
  wake_readers();
}

void RingWriter::write_header(uint8_t* b, bool in_place) {
  std::memcpy(b + OVL_OFF_MAGIC, OVL_MAGIC, OVL_MAGIC_LEN);
  *u32(b, OVL_OFF_VERSION) = OVL_VERSION;
  *u32(b, OVL_OFF_HEADER_SIZE) = OVL_HEADER_SIZE;
  *u64(b, OVL_OFF_CAPACITY) = capacity_;
  __atomic_store_n(u32(b, OVL_OFF_PID), static_cast<uint32_t>(getpid()), __ATOMIC_RELAXED);
  __atomic_store_n(u32(b, OVL_OFF_FLAGS), 0u, __ATOMIC_RELAXED);
  *u32(b, OVL_OFF_MAX_SLOTS) = max_slots_;
  *u32(b, OVL_OFF_VOCAB_SIZE) = vocab_size_;
  __atomic_store_n(u64(b, OVL_OFF_TAIL), 0ull, __ATOMIC_RELAXED);
  __atomic_store_n(u64(b, OVL_OFF_TAIL_INTENT), 0ull, __ATOMIC_RELAXED);
  __atomic_store_n(u64(b, OVL_OFF_HEAD), 0ull, __ATOMIC_RELAXED);
  __atomic_store_n(u64(b, OVL_OFF_HEARTBEAT), static_cast<uint64_t>(now_ns()), __ATOMIC_RELAXED);
  std::memset(b + OVL_OFF_MODEL_NAME, 0, OVL_MODEL_NAME_LEN);
  std::memcpy(b + OVL_OFF_MODEL_NAME, model_name_.data(), model_name_.size());
  for (const auto& r : kZeroRanges) std::memset(b + r.first, 0, r.second - r.first);
  if (in_place) {
    // notify and waiters stay: readers may be asleep on them. Readers keep
    // their slots; their cursors restart with the new epoch's positions
    // (each reader stores its own again as soon as it sees the new epoch).
    for (int i = 0; i < OVL_NUM_SLOTS; i++)
      __atomic_store_n(u64(b, OVL_OFF_SLOTS + i * OVL_SLOT_SIZE + OVL_SLOT_OFF_CURSOR), 0ull,
                       __ATOMIC_RELAXED);
  } else {
    __atomic_store_n(u32(b, OVL_OFF_NOTIFY), 0u, __ATOMIC_RELAXED);
    __atomic_store_n(u32(b, OVL_OFF_WAITERS), 0u, __ATOMIC_RELAXED);
    std::memset(b + OVL_OFF_SLOTS, 0, OVL_NUM_SLOTS * OVL_SLOT_SIZE);
  }
  __atomic_thread_fence(__ATOMIC_RELEASE);
}

uint8_t* RingWriter::data(uint64_t pos) const { return base_ + kHeader + (pos & (capacity_ - 1)); }

uint8_t* RingWriter::try_reserve(size_t body_len) {
  if (!base_) throw std::logic_error("ring writer is closed");
  if (res_len_) throw std::logic_error("a reservation is already open; commit() or cancel() it first");
  if (body_len > max_record_ - kRecHeader)
    throw std::invalid_argument("record body of " + std::to_string(body_len) +
                                " bytes is too large for this ring (max " +
                                std::to_string(max_record_ - kRecHeader) + ")");
  const uint64_t rec = kRecHeader + ovl_align8(body_len);
  const uint64_t room = capacity_ - (tail_ & (capacity_ - 1));
  const uint64_t pad = rec > room ? room : 0;  // records never wrap
  const uint64_t start = tail_ + pad;
  const uint64_t end = start + rec;
  // tail_intent never moves back, even after a cancelled reservation whose
  // bytes already overwrote old records.
  const uint64_t intent = std::max(intent_, end);
  if (!backpressure_allows(intent)) return nullptr;

  advance_head(intent);
  intent_ = intent;
  __atomic_store_n(u64(base_, OVL_OFF_TAIL_INTENT), intent, __ATOMIC_RELEASE);
  __atomic_thread_fence(__ATOMIC_RELEASE);  // store-store: intent before any byte below

  if (pad) write_pad(tail_, pad);
  uint8_t* r = data(start);
  __atomic_store_n(u64(r, 0), rec | (static_cast<uint64_t>(OVL_TYPE_STEP) << 32), __ATOMIC_RELAXED);
  __atomic_store_n(u64(r, OVL_REC_OFF_SEQ), next_seq_, __ATOMIC_RELAXED);
  __atomic_store_n(u64(r, OVL_REC_OFF_PUBLISH_NS), 0ull, __ATOMIC_RELAXED);
  std::memset(r + kRecHeader + body_len, 0, rec - kRecHeader - body_len);
  res_pos_ = start;
  res_end_ = end;
  res_len_ = rec;
  return r + kRecHeader;
}

uint64_t RingWriter::commit() {
  if (!base_) throw std::logic_error("ring writer is closed");
  if (!res_len_) throw std::logic_error("no reservation is open");
  const uint64_t seq = next_seq_++;
  const uint64_t now = static_cast<uint64_t>(now_ns());
  __atomic_store_n(u64(data(res_pos_), OVL_REC_OFF_PUBLISH_NS), now, __ATOMIC_RELAXED);
  tail_ = res_end_;
  res_len_ = 0;
  __atomic_store_n(u64(base_, OVL_OFF_TAIL), tail_, __ATOMIC_RELEASE);
  __atomic_store_n(u64(base_, OVL_OFF_HEARTBEAT), now, __ATOMIC_RELAXED);
  wake_readers();
  return seq;
}

void RingWriter::cancel() { res_len_ = 0; }

int64_t RingWriter::publish(const void* body, size_t len) {
  uint8_t* p = try_reserve(len);
  if (!p) return -1;
  if (len) std::memcpy(p, body, len);
  return static_cast<int64_t>(commit());
}

void RingWriter::write_pad(uint64_t pos, uint64_t len) {
  uint8_t* p = data(pos);
  __atomic_store_n(u64(p, 0), len | (static_cast<uint64_t>(OVL_TYPE_PAD) << 32), __ATOMIC_RELAXED);
  // An 8-byte PAD is only length and type; longer ones get a zeroed rest of
  // the header so nothing stale looks like a seq.
  if (len >= 16) __atomic_store_n(u64(p, 8), 0ull, __ATOMIC_RELAXED);
  if (len >= 24) __atomic_store_n(u64(p, 16), 0ull, __ATOMIC_RELAXED);
}

// Moves head past every record that starts before intent - capacity: the
// bytes up to intent overwrite them. We wrote those records, so their
// lengths are intact (head only ever points at intact records).
void RingWriter::advance_head(uint64_t intent) {
  if (intent <= capacity_) return;
  const uint64_t first_intact = intent - capacity_;
  if (head_ >= first_intact) return;
  while (head_ < first_intact && head_ < tail_) {
    const uint32_t len = static_cast<uint32_t>(__atomic_load_n(u64(data(head_), 0), __ATOMIC_RELAXED));
    if (len < OVL_PAD_MIN || (len & 7u)) {  // cannot happen with our own records; do not loop forever
      head_ = tail_;
      break;
    }
    head_ += len;
  }
  __atomic_store_n(u64(base_, OVL_OFF_HEAD), head_, __ATOMIC_RELEASE);
}

void RingWriter::wake_readers() {
  __atomic_fetch_add(u32(base_, OVL_OFF_NOTIFY), 1u, __ATOMIC_SEQ_CST);
  // Pairs with the reader's "register in waiters, then re-check tail".
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (__atomic_load_n(u32(base_, OVL_OFF_WAITERS), __ATOMIC_SEQ_CST) != 0)
    syscall(SYS_futex, u32(base_, OVL_OFF_NOTIFY), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

void RingWriter::heartbeat() {
  if (!base_) return;
  __atomic_store_n(u64(base_, OVL_OFF_HEARTBEAT), static_cast<uint64_t>(now_ns()), __ATOMIC_RELAXED);
}

// Whether overwriting up to `intent` leaves every active reader's unread
// bytes alone: each cursor must be >= intent - capacity, the same bound a
// reader uses to call its copy torn. The minimum found is cached; cursors
// only grow and a reader that joins later starts at or after our tail as of
// the scan (ring.h, ovl__claim_slot), so the cache stays a lower bound.
bool RingWriter::backpressure_allows(uint64_t intent) {
  if (!backpressure_ || intent <= capacity_) return true;
  const uint64_t need = intent - capacity_;
  if (need <= bp_min_cursor_) return true;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  uint64_t lowest = tail_;
  for (int i = 0; i < OVL_NUM_SLOTS; i++) {
    uint8_t* s = base_ + OVL_OFF_SLOTS + i * OVL_SLOT_SIZE;
    if (__atomic_load_n(u32(s, OVL_SLOT_OFF_ACTIVE), __ATOMIC_ACQUIRE) != 1u) continue;
    const uint32_t pid = __atomic_load_n(u32(s, OVL_SLOT_OFF_PID), __ATOMIC_ACQUIRE);
    if (pid == 0) continue;  // being claimed; it will start at or after our tail
    const uint64_t c = __atomic_load_n(u64(s, OVL_SLOT_OFF_CURSOR), __ATOMIC_ACQUIRE);
    if (c < need && !slot_alive_or_free(i)) continue;  // a dead reader holds nobody back
    lowest = std::min(lowest, c);
  }
  bp_min_cursor_ = lowest;
  return need <= lowest;
}

// Returns true if slot i belongs to a live process; otherwise frees it.
// (A reader in another pid namespace looks dead to us; it notices the
// eviction and claims a slot again, see ovl__check_slot.)
bool RingWriter::slot_alive_or_free(int i) {
  uint8_t* s = base_ + OVL_OFF_SLOTS + i * OVL_SLOT_SIZE;
  uint32_t pid = __atomic_load_n(u32(s, OVL_SLOT_OFF_PID), __ATOMIC_ACQUIRE);
  if (pid == 0 || process_alive(pid)) return true;
  // CAS on pid: if the owner released the slot and a new reader claimed it
  // meanwhile, pid is no longer the dead one and we leave the slot alone.
  if (__atomic_compare_exchange_n(u32(s, OVL_SLOT_OFF_PID), &pid, 0u, false, __ATOMIC_ACQ_REL,
                                  __ATOMIC_RELAXED)) {
    __atomic_store_n(u32(s, OVL_SLOT_OFF_ACTIVE), 0u, __ATOMIC_RELEASE);
    readers_evicted_++;
  }
  return false;
}

int RingWriter::evict_dead_readers() {
  if (!base_) return 0;
  const uint64_t before = readers_evicted_;
  for (int i = 0; i < OVL_NUM_SLOTS; i++) {
    uint8_t* s = base_ + OVL_OFF_SLOTS + i * OVL_SLOT_SIZE;
    if (__atomic_load_n(u32(s, OVL_SLOT_OFF_ACTIVE), __ATOMIC_ACQUIRE) != 1u) continue;
    if (__atomic_load_n(u32(s, OVL_SLOT_OFF_PID), __ATOMIC_ACQUIRE) == 0) continue;
    slot_alive_or_free(i);
  }
  return static_cast<int>(readers_evicted_ - before);
}

int RingWriter::active_readers() const {
  if (!base_) return 0;
  int n = 0;
  for (int i = 0; i < OVL_NUM_SLOTS; i++)
    if (__atomic_load_n(u32(base_, OVL_OFF_SLOTS + i * OVL_SLOT_SIZE + OVL_SLOT_OFF_ACTIVE),
                        __ATOMIC_ACQUIRE) == 1u)
      n++;
  return n;
}

void RingWriter::close(bool clean) {
  if (!base_) return;
  res_len_ = 0;
  heartbeat();
  if (clean) __atomic_fetch_or(u32(base_, OVL_OFF_FLAGS), OVL_FLAG_CLOSED, __ATOMIC_RELEASE);
  wake_readers();  // so sleeping readers see the close now, not at their next slice
  {
    std::lock_guard<std::mutex> lock(g_open_mu);
    g_open.erase({dev_, ino_});
  }
  base_ = nullptr;
  map_.reset();  // unmaps unless a Python view still holds it
}

uint64_t RingWriter::bench_publish(uint64_t count, size_t body_len, uint64_t interval_ns,
                                   uint64_t stop_after_ns) {
  const int64_t start = now_ns();
  const int64_t deadline = stop_after_ns ? start + static_cast<int64_t>(stop_after_ns) : INT64_MAX;
  const size_t words = ovl_align8(body_len) / 8;
  int64_t next_at = start;
  for (uint64_t n = 0; n < count; n++) {
    if (interval_ns) {
      while (now_ns() < next_at) ovl__cpu_relax();
      next_at += static_cast<int64_t>(interval_ns);
    }
    uint8_t* p;
    int64_t last_beat = now_ns();
    while (!(p = try_reserve(body_len))) {
      const int64_t now = now_ns();
      if (now >= deadline) return n;
      if (now - last_beat > 1'000'000) {  // blocked, not dead: keep the heartbeat fresh
        heartbeat();
        last_beat = now;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    uint64_t* w = reinterpret_cast<uint64_t*>(p);
    for (size_t i = 0; i < words; i++) w[i] = bench_word(next_seq_, i);
    commit();
  }
  return count;
}

}  // namespace overlapd
