// Checkout types and lease results of the public API. No CAF here.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include "dspex/error.hpp"

namespace dspex {

/// What a caller asks the pool for, as in the original SessionPoolV2:
/// `session(id)` (a session's call; the session id is recorded on the worker
/// until checkin), `anonymous` (a call outside any session), `any_worker`
/// (any worker, e.g. for administration).
class checkout_type {
public:
  enum class kind { session, anonymous, any_worker };

  /// A checkout for session `session_id` (recorded on the worker until checkin).
  static checkout_type session(std::string session_id);
  /// A checkout for no session.
  static checkout_type anonymous();
  /// Any worker, for maintenance (no session recorded).
  static checkout_type any_worker();

  /// Parses "session:<id>", "anonymous" or "any_worker"; anything else is
  /// the caller's error system_error/unknown_checkout_type, never a removal.
  static std::variant<checkout_type, error> parse(std::string_view text);

  kind what() const noexcept { return kind_; }
  const std::string& session_id() const noexcept { return session_id_; }
  /// @returns "session:<id>", "anonymous" or "any_worker".
  std::string to_string() const;

private:
  checkout_type(kind k, std::string sid) : kind_(k), session_id_(std::move(sid)) {
  }
  kind kind_ = kind::anonymous;
  std::string session_id_;
};

/// How a session's call chooses its worker (issue 5, item 3). Per pool
/// (session.affinity), overridable per call.
///  - hint: the session's worker when it is idle, else any idle worker;
///  - strict_queue: wait for the session's worker; if it is gone, rebind to another;
///  - strict_fail_fast: the session's worker or, when it is busy, resource_error/worker_busy at once;
///    if it is gone, rebind to another.
/// A call without a preferred worker (a new session) takes any worker.
enum class affinity_mode { hint, strict_queue, strict_fail_fast };

/// "hint", "strict_queue", "strict_fail_fast".
const char* to_string(affinity_mode m) noexcept;
/// @returns the mode named `name` (hint, strict_queue, strict_fail_fast), or
///          nullopt for any other name.
std::optional<affinity_mode> affinity_mode_from_string(std::string_view name) noexcept;

/// How a lease ends, as NimblePool's checkin statuses: the worker is fine
/// (`ok`), something went wrong but the worker may be reused (`error`), or
/// the caller closed the connection and the worker must not be reused (`close`).
struct checkin_status {
  enum class kind { ok, error, close };
  kind what = kind::ok;
  std::optional<dspex::error> reason;  ///< with `error`

  static checkin_status ok() { return {kind::ok, std::nullopt}; }
  static checkin_status failed(dspex::error e) { return {kind::error, std::move(e)}; }
  static checkin_status close() { return {kind::close, std::nullopt}; }
};

} // namespace dspex
