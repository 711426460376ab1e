// Parallel file I/O for NVMe offload: one tensor <-> one file region, split into block_size requests
// served by a pool of worker threads (each keeps one blocking pread/pwrite in flight, so
// `workers` = thread_count x queue_depth requests are outstanding at once).
//
// O_DIRECT is used where the file system accepts it: the bulk of the region (offset aligned, length
// rounded down to kAlign) goes through an O_DIRECT descriptor, through a per-worker aligned bounce
// buffer when the tensor memory itself is not aligned; the unaligned tail, and everything when
// O_DIRECT cannot be opened or a request is refused with EINVAL, goes through a buffered descriptor.
// Short reads (the file shrank under us) and I/O errors raise; nothing is silently left unwritten.

#include <pybind11/pybind11.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kAlign = 4096;

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

struct Request {
  int64_t start;  // byte offset within the tensor
  int64_t len;
  bool direct;
};

std::string describe_errno(const char* what, const std::string& path, int err) {
  return std::string(what) + " " + path + ": " + std::strerror(err);
}

// Move `len` bytes between `mem` and `fd` at `pos`, looping over partial transfers.
// Returns 0, or an errno; a read that hits end-of-file returns -1.
int transfer(bool write, int fd, char* mem, int64_t len, int64_t pos) {
  while (len > 0) {
    ssize_t n = write ? ::pwrite(fd, mem, size_t(len), off_t(pos)) : ::pread(fd, mem, size_t(len), off_t(pos));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return write ? EIO : -1;
    mem += n;
    pos += n;
    len -= n;
  }
  return 0;
}

int64_t run(bool write, uintptr_t address, int64_t nbytes, const std::string& path, int64_t offset,
            int64_t block, int workers, bool direct, bool sync) {
  if (nbytes < 0 || offset < 0 || block <= 0 || workers <= 0)
    throw std::invalid_argument("aio: nbytes and offset must be >= 0, block_size and workers > 0");
  // a write at offset 0 replaces the file (like tensor.numpy().tofile); elsewhere it grows as needed
  const int flags = write ? (O_WRONLY | O_CREAT | (offset == 0 ? O_TRUNC : 0)) : O_RDONLY;
  Fd buffered(::open(path.c_str(), flags, 0644));
  if (buffered.fd < 0) throw std::runtime_error(describe_errno("aio: cannot open", path, errno));

  int direct_fd = -1;
  if (direct && offset % kAlign == 0 && nbytes >= kAlign) {
    direct_fd = ::open(path.c_str(), (write ? O_WRONLY : O_RDONLY) | O_DIRECT);  // -1: fs refuses
  }
  Fd direct_guard(direct_fd);
  const int64_t aligned_bytes = direct_fd >= 0 ? (nbytes / kAlign) * kAlign : 0;
  block = direct_fd >= 0 ? std::max(kAlign, (block / kAlign) * kAlign) : block;

  std::vector<Request> requests;
  for (int64_t s = 0; s < aligned_bytes; s += block) requests.push_back({s, std::min(block, aligned_bytes - s), true});
  for (int64_t s = aligned_bytes; s < nbytes; s += block) requests.push_back({s, std::min(block, nbytes - s), false});

  char* base = reinterpret_cast<char*>(address);
  const bool mem_aligned = (address % kAlign) == 0;
  std::atomic<size_t> next{0};
  std::atomic<int> error{0};
  auto worker = [&]() {
    char* bounce = nullptr;
    if (aligned_bytes > 0 && !mem_aligned && ::posix_memalign(reinterpret_cast<void**>(&bounce), kAlign, size_t(block)) != 0) {
      bounce = nullptr;
    }
    for (size_t i = next.fetch_add(1); i < requests.size() && error.load() == 0; i = next.fetch_add(1)) {
      const Request& r = requests[i];
      char* mem = base + r.start;
      int err = 0;
      bool done = false;
      if (r.direct && (mem_aligned || bounce != nullptr)) {
        char* io = mem_aligned ? mem : bounce;
        if (write && !mem_aligned) std::memcpy(io, mem, size_t(r.len));
        err = transfer(write, direct_fd, io, r.len, offset + r.start);
        if (err == 0 && !write && !mem_aligned) std::memcpy(mem, io, size_t(r.len));
        done = (err != EINVAL);  // EINVAL: the fs wants another alignment; go buffered
      }
      if (!done) err = transfer(write, buffered.fd, mem, r.len, offset + r.start);
      if (err != 0) {
        int expected = 0;
        error.compare_exchange_strong(expected, err);
      }
    }
    std::free(bounce);
  };
  {
    const int n = std::max(1, std::min<int>(workers, int(requests.size())));
    std::vector<std::thread> threads;
    for (int t = 1; t < n; ++t) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
  }
  const int err = error.load();
  if (err == -1)
    throw std::runtime_error("aio: short read from " + path + ": the file ended before " +
                             std::to_string(offset + nbytes) + " bytes (it changed while being read?)");
  if (err != 0) throw std::runtime_error(describe_errno(write ? "aio: write to" : "aio: read from", path, err));
  if (write && sync && ::fdatasync(buffered.fd) != 0)
    throw std::runtime_error(describe_errno("aio: fdatasync", path, errno));
  return nbytes;
}

}  // namespace

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_ops parallel file I/O (O_DIRECT where the file system allows)";
  m.def("pwrite", [](uintptr_t address, int64_t nbytes, const std::string& path, int64_t offset, int64_t block,
                     int workers, bool direct, bool sync) {
          return run(true, address, nbytes, path, offset, block, workers, direct, sync);
        }, py::call_guard<py::gil_scoped_release>());
  m.def("pread", [](uintptr_t address, int64_t nbytes, const std::string& path, int64_t offset, int64_t block,
                    int workers, bool direct) {
          return run(false, address, nbytes, path, offset, block, workers, direct, false);
        }, py::call_guard<py::gil_scoped_release>());
}
