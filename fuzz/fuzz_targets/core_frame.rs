//! The core's frame reader and postcard decoding of requests and replies,
//! fed in pieces as a socket would deliver them.
#![no_main]

use ioasid_fuzz::Input;
use iommu_core::wire::{self, FrameReader, FromCore, Request};
use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let chunk = usize::from(input.u8()).max(1);
    let mut reader = FrameReader::new(MAX_PAYLOAD, 4);
    let mut pushed = 0usize;
    while !input.is_empty() {
        let bytes = input.bytes(chunk);
        pushed += bytes.len();
        reader.push(bytes, Vec::new());
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= MAX_PAYLOAD, "a frame above the limit");
                    assert!(frame.fds.is_empty(), "fds out of nowhere");
                    check_request(&frame.payload);
                    let _ = wire::decode::<FromCore>(&frame.payload);
                }
                Ok(None) => break,
                Err(e) => {
                    // An error is final for the connection; its errno must
                    // be one the server sends.
                    let _ = e.errno();
                    return;
                }
            }
        }
        assert!(reader.buffered() <= pushed, "the reader holds more than it was given");
    }
});

fn check_request(payload: &[u8]) {
    let Ok(env) = wire::decode::<Request>(payload) else { return };
    // What the server asks of every request must not panic.
    let _ = (env.body.fds_expected(), env.body.read_only(), env.body.channel_only());
    // A decoded request encodes back to something that decodes the same.
    let again = wire::encode(env.seq, &env.body, env.body.fds_expected()).expect("a decoded request encodes");
    let back = wire::decode::<Request>(&again[wire::HEADER_LEN..]).expect("an encoded request decodes");
    assert_eq!(back.seq, env.seq);
    assert_eq!(back.body, env.body);
}
