// Package reliability holds no code: its tests prove that the enclave
// signer and the host proxy, run as their real fx graphs on TCP loopback
// (internal/enclavetest's way), keep working under load, faults and hostile
// input, and leak nothing. docs/RELIABILITY.md lists every case and its
// outcome.
//
//   - catalogue_test.go: the bad-input catalogue, against the enclave and
//     the proxy: API mistakes, malformed messages and metadata, and wire
//     abuse (garbage, HTTP/1.1, TLS on a plaintext port, slowloris,
//     half-open connections, ping floods, 10,000 streams on one
//     connection). Each gets its precise status or a closed connection,
//     and the next good call is served.
//   - faults_test.go: the enclave killed and restarted under load through
//     the proxy, the proxy restarted under client load, stalled upstreams,
//     the in-flight and connection bounds under overload; goroutines and
//     heap return to their baseline.
//   - soak_test.go: mixed Echo and Sign through the proxy with zero errors
//     and flat memory. CI runs a short soak; NITROSIGN_SOAK_CALLS=1000000
//     runs the full one (`make soak`).
//
// The same scenarios run over real AF_VSOCK, with the real binaries, in
// e2e/faults_test.go.
package reliability
