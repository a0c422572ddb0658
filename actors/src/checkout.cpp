#include "dspex/checkout.hpp"

namespace dspex {

checkout_type checkout_type::session(std::string session_id) {
  return checkout_type{kind::session, std::move(session_id)};
}

checkout_type checkout_type::anonymous() {
  return checkout_type{kind::anonymous, {}};
}

checkout_type checkout_type::any_worker() {
  return checkout_type{kind::any_worker, {}};
}

std::variant<checkout_type, error> checkout_type::parse(std::string_view text) {
  if (text == "anonymous")
    return anonymous();
  if (text == "any_worker")
    return any_worker();
  constexpr std::string_view prefix = "session:";
  if (text.substr(0, prefix.size()) == prefix && text.size() > prefix.size())
    return session(std::string{text.substr(prefix.size())});
  return make_error(error_category::system_error, "unknown_checkout_type",
                    "unknown checkout type '" + std::string{text}
                      + "' (expected session:<id>, anonymous or any_worker)",
                    {{"checkout_type", std::string{text}}});
}

std::string checkout_type::to_string() const {
  switch (kind_) {
    case kind::session: return "session:" + session_id_;
    case kind::anonymous: return "anonymous";
    case kind::any_worker: return "any_worker";
  }
  return "anonymous";
}

const char* to_string(affinity_mode m) noexcept {
  switch (m) {
    case affinity_mode::hint: return "hint";
    case affinity_mode::strict_queue: return "strict_queue";
    case affinity_mode::strict_fail_fast: return "strict_fail_fast";
  }
  return "hint";
}

std::optional<affinity_mode> affinity_mode_from_string(std::string_view name) noexcept {
  for (auto m : {affinity_mode::hint, affinity_mode::strict_queue, affinity_mode::strict_fail_fast})
    if (name == to_string(m))
      return m;
  return std::nullopt;
}

} // namespace dspex
