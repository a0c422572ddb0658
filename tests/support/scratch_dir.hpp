// A private directory under /tmp for the scripts, interpreters and outputs a
// test writes, breaks or removes; removed with everything in it at the end.
#pragma once

#include <filesystem>
#include <string>

namespace dspex::testing {

struct scratch_dir {
  std::filesystem::path path;

  scratch_dir();
  ~scratch_dir();
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;

  /// Writes `text` to `name` in the directory (executable when asked).
  /// @returns the file's path
  std::filesystem::path write(const std::string& name, const std::string& text,
                              bool executable = false) const;
};

} // namespace dspex::testing
