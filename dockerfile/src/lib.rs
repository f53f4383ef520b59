//! The Dockerfile frontend of ossb: a BuildKit-compatible parser, shell-word expansion,
//! `.dockerignore` matching, and planning a build into a [`BuildPlan`].
//!
//! Use it in three calls:
//! ```
//! use std::collections::HashMap;
//! let df = ossb_dockerfile::parse("FROM alpine\nRUN echo hi\n", "Dockerfile").unwrap();
//! let opts = ossb_dockerfile::PlanOptions::default();
//! // Phase 1: which base images to fetch configs for.
//! assert_eq!(ossb_dockerfile::base_images(&df, &opts).unwrap(), vec!["alpine"]);
//! // Phase 2: the plan, every word expanded.
//! let plan = ossb_dockerfile::plan(&df, &opts, &HashMap::new()).unwrap();
//! assert_eq!(plan.stages[0].steps[0].created_by, "RUN /bin/sh -c echo hi # buildkit");
//! ```
//! [`checks`] runs BuildKit's build checks (lint rules) over a parsed Dockerfile.
//! [`dump`] prints the parse tree in BuildKit's format (`ossb debug parse`).
//! The build engine never parses Dockerfile text: everything it needs is in the plan.
//! Every error is an [`Error`] carrying file, line, column, the line and a hint.

pub mod checks;
pub mod dockerignore;
mod dump;
mod error;
mod flags;
mod json;
mod key;
mod plan;
pub mod shell;
mod syntax;

pub use dump::{dump, dump_node, go_quote};
pub use error::Error;
pub use key::{instruction_key_bytes, link_layer_key_bytes, linked, KEY_VERSION};
pub use ossb_protocol::clip;
pub use plan::{
    base_contexts_with_platforms, base_images, base_images_with_platforms, context_key,
    context_name, plan, unused_build_args, validate, Base, BaseImageInfo, BuildPlan, Copy,
    Healthcheck, InlineFile, Instruction, Location, Mount, MountType, Network, PlanOptions, Run,
    SbomScan, Security, Sharing, Source, Stage, StageNode, Step, DEFAULT_PATH, DEFAULT_SHELL,
    MAX_VARIABLE_LEN, PROXY_ARGS, SBOM_SCAN_ARGS,
};
pub use syntax::{
    parse, parse_heredoc, Directive, Dockerfile, Heredoc, Node, Warning, INSTRUCTIONS,
};
