#include "support/scratch_dir.hpp"

#include <stdlib.h>

#include <fstream>
#include <stdexcept>

namespace fs = std::filesystem;

namespace dspex::testing {

scratch_dir::scratch_dir() {
  char tmpl[] = "/tmp/dspex-test-XXXXXX";
  if (!::mkdtemp(tmpl))
    throw std::runtime_error("scratch_dir: mkdtemp failed");
  path = tmpl;
}

scratch_dir::~scratch_dir() {
  std::error_code ec;
  fs::remove_all(path, ec);
}

fs::path scratch_dir::write(const std::string& name, const std::string& text,
                            bool executable) const {
  auto p = path / name;
  std::ofstream{p} << text;
  if (executable)
    fs::permissions(p, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec
                         | fs::perms::others_read | fs::perms::others_exec);
  return p;
}

} // namespace dspex::testing
