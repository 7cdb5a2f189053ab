//! `http-echo`: a `wasi:http/proxy` component that answers 200 with the
//! request body, the same work as Cascade's `echo` function. Only the
//! benchmarks use it, served by `wasmtime serve`.

use std::io::{Read as _, Write as _};
use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(HttpEcho);

struct HttpEcho;

/// Reads the whole request body (empty when there is none or it fails).
fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut body = Vec::new();
    if let Ok(incoming) = request.consume() {
        if let Ok(mut stream) = incoming.stream() {
            let _ = stream.read_to_end(&mut body);
        }
        drop(IncomingBody::finish(incoming));
    }
    body
}

impl wasip2::exports::http::incoming_handler::Guest for HttpEcho {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let body = read_body(&request);
        let headers = Fields::new();
        let _ = headers.set("content-type", &[b"application/octet-stream".to_vec()]);
        let response = OutgoingResponse::new(headers);
        let Ok(outgoing) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(mut out) = outgoing.write() {
            let _ = out.write_all(&body);
            let _ = out.flush();
        }
        let _ = OutgoingBody::finish(outgoing, None);
    }
}
