// dspy_adapter: what the runtime knows of DSPy, the bundled worker's
// commands (command_adapter.hpp), in one place.
//
// Anonymous calls: configure_lm passes the pool (which makes it the pool's
// LM), and create_program / execute_program / delete_program pass the pool
// client, which keeps the definitions of anonymous programs
// (session.max_anonymous_programs, least recently used first out) so that
// an anonymous execute_program carries its program_data and runs on any
// worker.
//
// Sessions: a session holds its programs' definitions and its own LM, so
// whichever worker serves it can run them:
//  - create_program is remembered when a worker accepted it; execute_program
//    carries the definition (program_data) and the session's LM
//    (lm_override); a create is safe to run again (the session, not the
//    worker, holds the definition);
//  - list_programs, get_program_info, delete_program, cleanup_session and
//    configure_lm are answered from the session's state, in the worker's
//    result shapes; a delete or a cleanup then goes to every worker that
//    served the session (their caches must not outlive the session's);
//  - a worker that still caches an earlier program of an id refuses its
//    create ("Program already exists"): the program is deleted there and
//    created again (twice at most);
//  - at the end every worker that served the session gets cleanup_session.
// Internal to actors/.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "command_adapter.hpp"

namespace dspex::detail {

/// The DSPy adapter of the session `session_id` (a session_adapter_factory).
std::unique_ptr<session_adapter> make_dspy_session(const std::string& session_id);

/// The DSPy adapter of anonymous calls.
/// @param max_programs anonymous programs' definitions kept (session.max_anonymous_programs)
std::shared_ptr<anonymous_adapter> make_dspy_anonymous(std::size_t max_programs);

} // namespace dspex::detail
