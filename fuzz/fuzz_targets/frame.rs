//! The cluster's frames as every node reads them (coordinator, worker, cache node: one
//! decoder): arbitrary bytes arriving in two pieces, then each frame's message as the
//! coordinator checks a submission. No panic; a decoded message encodes to a frame that decodes
//! to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ossb_protocol::cluster::{check_entries, ClusterMessage};
use ossb_protocol::frame::{decode, encode, Decoder, HEADER_LEN};
use ossb_protocol::wire::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let split = (split as usize).min(bytes.len());
    let mut decoder = Decoder::new();
    decoder.push(&bytes[..split]);
    let mut frames = Vec::new();
    let mut pushed_rest = false;
    loop {
        match decoder.next_frame() {
            Ok(Some(envelope)) => frames.push(envelope),
            Ok(None) if !pushed_rest => {
                decoder.push(&bytes[split..]);
                pushed_rest = true;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = decode(bytes);
    for envelope in frames {
        let frame = encode(&envelope).expect("a decoded message encodes");
        assert_eq!(
            decode(&frame[HEADER_LEN..]).expect("its own frame decodes"),
            envelope
        );
        if let Message::Cluster(message) = &envelope.message {
            if let ClusterMessage::Submit(spec) = message.as_ref() {
                let _ = check_entries(&spec.context);
                for (_, entries) in &spec.build_contexts {
                    let _ = check_entries(entries);
                }
            }
        }
    }
});
