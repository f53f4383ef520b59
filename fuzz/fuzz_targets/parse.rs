//! Parse, dump and plan arbitrary text: none of it may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let src = String::from_utf8_lossy(data);
    if let Ok(df) = ossb_dockerfile::parse(&src, "Dockerfile") {
        let _ = ossb_dockerfile::dump(&df);
        let opts = ossb_dockerfile::PlanOptions::default();
        let _ = ossb_dockerfile::base_images(&df, &opts);
        let _ = ossb_dockerfile::plan(&df, &opts, &Default::default());
    }
});
