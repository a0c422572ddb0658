// dspy_session: what a session knows of DSPy (the session_adapter of the
// bundled DSPy worker). A session holds its programs' definitions and its
// own LM, so whichever worker serves it can run them:
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

#include <memory>
#include <string>

#include "session_adapter.hpp"

namespace dspex::detail {

/// The DSPy adapter of the session `session_id` (a session_adapter_factory).
std::unique_ptr<session_adapter> make_dspy_session(const std::string& session_id);

} // namespace dspex::detail
