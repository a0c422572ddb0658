// dspy_adapter: see dspy_adapter.hpp. The command names, argument names,
// result shapes and error strings here are the bundled worker's
// (runtime/python/dspex_worker.py): a session's answer must read as the
// worker's would.
#include "dspy_adapter.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <utility>
#include <variant>
#include <vector>

#include "dspex/error.hpp"
#include "dspex/program_store.hpp"
#include "dspex/secrets.hpp"

namespace dspex::detail {

namespace {

double epoch_now() {
  using namespace std::chrono;
  return duration_cast<duration<double>>(system_clock::now().time_since_epoch()).count();
}

struct program_entry {
  nlohmann::json definition;  ///< the create_program args (session_id removed)
  double created_at = 0;
  std::uint64_t execution_count = 0;
  nlohmann::json last_executed = nullptr;
  std::uint64_t order = 0;  ///< creation order, for listing
};

class dspy_session final : public session_adapter {
public:
  explicit dspy_session(std::string session_id) : id_(std::move(session_id)) {}

  std::optional<local_answer> answer_locally(const call& c) override {
    auto* local = local_command_of(c.command);
    return local ? (this->*(local->answer))(c) : std::nullopt;
  }

  bool may_answer_locally(const call& c) const override {
    return local_command_of(c.command) != nullptr;
  }

  void complete(call& c, client_call_options& opts) const override {
    if (c.command == "execute_program" && !c.args.contains("program_data")) {
      auto pid = c.args.value("program_id", nlohmann::json(nullptr));
      if (pid.is_string()) {
        auto it = programs_.find(pid.get<std::string>());
        if (it != programs_.end())
          c.args["program_data"] = it->second.definition;
      }
    }
    if (c.command == "execute_program" && !lm_override_.is_null()
        && !c.args.contains("lm_override"))
      c.args["lm_override"] = lm_override_;
    if (c.command == "create_program" && !opts.idempotent) {
      // Safe to run again when its worker died before answering: the program
      // existed only in that worker, and the session (not the worker) holds
      // the definition. So a create is not lost to a worker's death.
      opts.idempotent = true;
    }
  }

  std::optional<repair> on_reply(const call& c, const outcome& o, int repairs) override {
    if (c.command == "create_program") {
      auto id = c.args.value("id", nlohmann::json(nullptr));
      if (o && id.is_string()) {
        program_entry p;
        p.definition = c.args;
        p.definition.erase("session_id");
        p.created_at = epoch_now();
        p.order = next_order_++;
        programs_[id.get<std::string>()] = std::move(p);
      } else if (!o && o.error().category == error_category::python_error && id.is_string()
                 && o.error().message.rfind("Program already exists", 0) == 0
                 && !o.served_by().empty() && repairs < 2) {
        // That worker still caches an earlier program of this id (deleted in
        // the session, or a former session of the same id): drop it there
        // and create again.
        return repair{o.served_by(), "delete_program", {{"program_id", id}}};
      }
    } else if (c.command == "execute_program" && o) {
      auto id = c.args.value("program_id", nlohmann::json(nullptr));
      if (id.is_string()) {
        auto it = programs_.find(id.get<std::string>());
        if (it != programs_.end()) {
          ++it->second.execution_count;
          it->second.last_executed = epoch_now();
        }
      }
    }
    return std::nullopt;
  }

  worker_sweep end_sweep() const override { return {"cleanup_session", nlohmann::json::object()}; }

  void note_sweep_answer(const outcome& o, nlohmann::json& entry) const override {
    if (o)
      entry["programs_removed"] = o.value().value("programs_removed", 0);
  }

  nlohmann::json info() const override {
    auto programs = nlohmann::json::array();
    for (auto& id : ids_in_order())
      programs.push_back(id);
    return {{"programs", std::move(programs)},
            {"program_count", programs_.size()},
            {"lm", redacted(lm_override_)}};
  }

  nlohmann::json end_summary(const nlohmann::json& sweep_entries) const override {
    std::uint64_t removed = 0;
    for (auto& r : sweep_entries)
      removed += r.value("programs_removed", std::uint64_t{0});
    return {{"programs", programs_.size()}, {"worker_programs_removed", removed}};
  }

private:
  // -- the commands a session answers from its own state --------------------
  // One table: answer_locally runs the entry, may_answer_locally (the
  // caller's fast path) asks only whether there is one.

  using local_handler = std::optional<local_answer> (dspy_session::*)(const call&);
  struct local_command {
    const char* name;
    local_handler answer;
  };

  static const local_command* local_command_of(const std::string& command) {
    static const local_command table[] = {
      {"list_programs", &dspy_session::list_programs},
      {"get_program_info", &dspy_session::get_program_info},
      {"delete_program", &dspy_session::delete_program},
      {"cleanup_session", &dspy_session::cleanup_session},
      {"configure_lm", &dspy_session::configure_lm},
      {"create_program", &dspy_session::refuse_duplicate_program},
    };
    for (auto& entry : table)
      if (command == entry.name)
        return &entry;
    return nullptr;
  }

  std::optional<local_answer> list_programs(const call&) {
    auto list = nlohmann::json::array();
    for (auto& id : ids_in_order())
      list.push_back(summary(id, programs_.at(id)));
    auto n = list.size();
    return local_answer{outcome::success({{"programs", std::move(list)}, {"total_count", n}}), {}};
  }

  /// The session's program named by the call's program_id, or the worker's
  /// error for a missing argument or an unknown program.
  std::variant<std::map<std::string, program_entry>::iterator, outcome>
  program_of(const call& c) {
    auto v = c.args.value("program_id", nlohmann::json(nullptr));
    if (!v.is_string() || v.get<std::string>().empty())
      return worker_failure("Missing required argument: program_id", c.command);
    auto id = v.get<std::string>();
    auto it = programs_.find(id);
    if (it == programs_.end())
      return worker_failure("Program not found: " + id, c.command);
    return it;
  }

  std::optional<local_answer> get_program_info(const call& c) {
    auto found = program_of(c);
    if (auto* failed = std::get_if<outcome>(&found))
      return local_answer{std::move(*failed), {}};
    auto it = std::get<0>(found);
    auto& p = it->second;
    return local_answer{outcome::success({{"program_id", it->first},
                                          {"signature", p.definition.value(
                                                          "signature", nlohmann::json::object())},
                                          {"created_at", p.created_at},
                                          {"execution_count", p.execution_count},
                                          {"last_executed", p.last_executed}}),
                        {}};
  }

  std::optional<local_answer> delete_program(const call& c) {
    auto found = program_of(c);
    if (auto* failed = std::get_if<outcome>(&found))
      return local_answer{std::move(*failed), {}};
    auto id = std::get<0>(found)->first;
    programs_.erase(std::get<0>(found));
    // Workers that cached the program must forget it, or a later program
    // with the same id would run the old definition there.
    return local_answer{outcome::success({{"program_id", id}, {"status", "deleted"}}),
                        worker_sweep{"delete_program", {{"program_id", id}}}};
  }

  std::optional<local_answer> cleanup_session(const call&) {
    auto n = programs_.size();
    programs_.clear();
    return local_answer{
      outcome::success({{"status", "cleaned"}, {"session_id", id_}, {"programs_removed", n}}),
      worker_sweep{"cleanup_session", nlohmann::json::object()}};
  }

  // A session's LM override: kept here (a worker's LM is shared by every
  // session it serves) and carried by each execution of the session.
  std::optional<local_answer> configure_lm(const call& c) {
    auto provider = c.args.value("provider", nlohmann::json(nullptr));
    if (!provider.is_string() || provider.get<std::string>().empty())
      return local_answer{worker_failure("Missing required argument: provider", c.command), {}};
    auto lm = c.args;
    lm.erase("session_id");
    lm_override_ = lm;
    return local_answer{outcome::success({{"status", "configured"},
                                          {"scope", "session"},
                                          {"session_id", id_},
                                          {"provider", provider},
                                          {"model", lm.value("model", nlohmann::json(nullptr))},
                                          {"temperature", lm.value("temperature", 0.7)}}),
                        {}};
  }

  // A create goes to a worker, unless the session already has that id.
  std::optional<local_answer> refuse_duplicate_program(const call& c) {
    auto v = c.args.value("id", nlohmann::json(nullptr));
    if (v.is_string() && programs_.count(v.get<std::string>()))
      return local_answer{worker_failure("Program already exists: " + v.get<std::string>(),
                                         c.command),
                          {}};
    return std::nullopt;
  }

  // The worker's own error shape for a command answered by the session.
  outcome worker_failure(const std::string& message, const std::string& command) const {
    return outcome::failure(make_error(error_category::python_error, "command_failed", message,
                                       {{"session_id", id_}, {"command", command}}));
  }

  std::vector<std::string> ids_in_order() const {
    std::vector<std::pair<std::uint64_t, std::string>> ids;
    for (auto& [id, p] : programs_)
      ids.emplace_back(p.order, id);
    std::sort(ids.begin(), ids.end());
    std::vector<std::string> out;
    for (auto& [order, id] : ids)
      out.push_back(id);
    return out;
  }

  nlohmann::json summary(const std::string& id, const program_entry& p) const {
    return {{"id", id},
            {"created_at", p.created_at},
            {"execution_count", p.execution_count},
            {"last_executed", p.last_executed},
            {"signature", p.definition.value("signature", nlohmann::json::object())},
            {"session_id", id_}};
  }

  const std::string id_;
  std::map<std::string, program_entry> programs_;
  std::uint64_t next_order_ = 0;
  /// The session's own LM (a configure_lm in the session), sent with each of
  /// its executions so it holds on whichever worker serves it; null: the pool's.
  nlohmann::json lm_override_;
};

// Anonymous programs (issue 5): create_program remembers the definition,
// execute_program carries it (program_data) unless the caller did, so an
// anonymous program runs on any worker; delete_program forgets it.
class dspy_anonymous final : public anonymous_adapter {
public:
  explicit dspy_anonymous(std::size_t max_programs)
    : programs_(std::make_shared<program_store>(max_programs)) {}

  bool lane_may_take(const std::string& command) const override {
    return command != "configure_lm" && command != "create_program"
           && command != "execute_program" && command != "delete_program";
  }

  void prepare(call& c, completion& done) override {
    if (!c.args.is_object())
      return;
    auto sid = c.args.value("session_id", nlohmann::json("anonymous"));
    std::string session = sid.is_string() ? sid.get<std::string>() : sid.dump();
    if (c.command == "execute_program") {
      auto pid = c.args.value("program_id", nlohmann::json(nullptr));
      if (pid.is_string() && !c.args.contains("program_data"))
        if (const auto* def = programs_->find({session, pid.get<std::string>()}))
          c.args["program_data"] = *def;
      return;
    }
    if (c.command == "delete_program") {
      auto pid = c.args.value("program_id", nlohmann::json(nullptr));
      if (pid.is_string())
        programs_->erase({session, pid.get<std::string>()});
      return;
    }
    if (c.command != "create_program")
      return;
    auto pid = c.args.value("id", nlohmann::json(nullptr));
    if (!pid.is_string())
      return;
    auto def = c.args;
    def.erase("session_id");
    done = completion{[programs = programs_, key = std::make_pair(session, pid.get<std::string>()),
                       def = std::move(def), inner = std::move(done.fn)](outcome o) {
      if (o)
        programs->put(key, def);
      inner(std::move(o));
    }};
  }

private:
  std::shared_ptr<program_store> programs_;
};

} // namespace

std::unique_ptr<session_adapter> make_dspy_session(const std::string& session_id) {
  return std::make_unique<dspy_session>(session_id);
}

std::shared_ptr<anonymous_adapter> make_dspy_anonymous(std::size_t max_programs) {
  return std::make_shared<dspy_anonymous>(max_programs);
}

} // namespace dspex::detail
