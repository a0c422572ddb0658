#include "support/worker_gate.hpp"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <stdexcept>

namespace dspex::testing {

worker_gate::worker_gate() {
  char dir[] = "/tmp/dspex_gate_XXXXXX";
  if (!::mkdtemp(dir))
    throw std::runtime_error("worker_gate: mkdtemp failed");
  path_ = std::string{dir} + "/open";
}

worker_gate::~worker_gate() {
  ::unlink(path_.c_str());
  ::rmdir(path_.substr(0, path_.rfind('/')).c_str());
}

nlohmann::json worker_gate::sleep_args(std::chrono::milliseconds bound) const {
  return {{"ms", bound.count()}, {"until_file", path_}};
}

void worker_gate::open() {
  int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0)
    throw std::runtime_error("worker_gate: cannot create " + path_);
  ::close(fd);
}

} // namespace dspex::testing
