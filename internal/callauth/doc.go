// Package callauth authenticates callers of the enclave, end to end: a
// caller signs each call it makes with its own private key, or signs once
// to open a session and MACs each call with the session's key, and the
// enclave checks the signature or MAC itself. The parent instance and the
// host proxy, which carry the call, are not trusted (see the trust model
// in the design): without the caller's private key or session key they
// can neither make a call of their own nor change one in flight, and a
// call they record and play again is refused by the enclave's ReplayCache.
//
// # Identities
//
// A caller's identity is an Ed25519 or ECDSA P-256 key pair (NewIdentity,
// LoadIdentity, stored as a PEM "PRIVATE KEY" block, PKCS#8, by
// Identity.Save). The enclave knows a caller by its public key (Caller,
// from ParsePublicKey) and names it by its key id: the lower-case hex
// SHA-256 of its DER SubjectPublicKeyInfo, the scheme of the signing keys'
// ids (KeyID).
//
// # What a call carries
//
// A signed call carries four gRPC metadata entries (all names lower case),
// each exactly once:
//
//	nitrosign-caller         the caller's key id: 64 lower-case hex digits
//	nitrosign-timestamp      when the call was signed: Unix time in
//	                         milliseconds, 1 to 15 decimal ASCII digits,
//	                         no sign, no leading zero (0 is "0")
//	nitrosign-nonce          16 random bytes, as 32 lower-case hex digits
//	nitrosign-signature-bin  the signature, 1 to 80 raw bytes (a "-bin"
//	                         entry: gRPC sends it base64-encoded and hands
//	                         the raw bytes to the server)
//
// # The canonical form (version 1)
//
// The signature covers these bytes, the "signed bytes", where "\n" is the
// single byte 0x0A and + is concatenation; there is no terminator and no
// other byte:
//
//	"nitrosign-call-v1" + "\n" +
//	method              + "\n" +
//	request_sha256      + "\n" +
//	caller              + "\n" +
//	timestamp           + "\n" +
//	nonce
//
// where:
//
//   - method is the full gRPC method name, as in the HTTP/2 :path of the
//     call, for example "/nitrosign.v1.SignerService/Sign": 2 to 256 bytes,
//     beginning with "/", each byte printable ASCII (0x21 to 0x7E), so
//     never a space or a newline. The enclave takes it from the call
//     itself, not from the metadata: a signature for one method is no
//     good for another.
//   - request_sha256 is the SHA-256 of the request message bytes, as 64
//     lower-case hex digits. The request message bytes are the serialized
//     protobuf message exactly as it travels in the gRPC message: the
//     payload of the length-prefixed gRPC message, decompressed if it was
//     compressed, without the 5-byte prefix. The server hashes the bytes
//     it received, never a re-encoding of the message it decoded (protobuf
//     encoding is not canonical). An empty message hashes as empty bytes.
//   - caller, timestamp and nonce are the values of nitrosign-caller,
//     nitrosign-timestamp and nitrosign-nonce, exactly as sent (their
//     syntax is above).
//
// No field can contain a newline and every field but method has a fixed
// length or a fixed alphabet, so the signed bytes split back into exactly
// one tuple (method, request_sha256, caller, timestamp, nonce): two calls
// that differ in any of them never share signed bytes. For example, a Sign
// call (its request message bytes replaced by the three bytes "abc" to keep
// the example short; the last line has no newline after it):
//
//	nitrosign-call-v1
//	/nitrosign.v1.SignerService/Sign
//	ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
//	<caller: 64 hex digits>
//	1767225600000
//	000102030405060708090a0b0c0d0e0f
//
// # The signature
//
//   - Ed25519 (RFC 8032, pure Ed25519, not Ed25519ph): the 64-byte
//     signature of the signed bytes themselves.
//   - ECDSA P-256: the signature of SHA-256(signed bytes), ASN.1 DER
//     SEQUENCE { r INTEGER, s INTEGER } (at most 72 bytes; X9.62 / RFC
//     3279, as crypto/ecdsa.SignASN1 and OpenSSL make it). Both s and its
//     negation verify: the replay cache is keyed by the nonce, not by the
//     signature, so this malleability gives nothing.
//
// Sign makes the four entries; UnaryClientInterceptor signs the calls a
// client makes, sending exactly the bytes it signed.
//
// # Sessions
//
// Verifying a signature on every call costs the enclave about as much as
// the signature it then makes. A caller may instead open a session once
// and authenticate each call with a MAC:
//
//  1. The caller makes a fresh X25519 key pair (RFC 7748) and calls
//     SessionService.OpenSession with its 32-byte public key
//     (client_share), signed as above (a session call to OpenSession is
//     refused).
//
//  2. The enclave makes a fresh X25519 key pair, computes the shared
//     secret Z (an all-zero Z, from a low-order share, is refused with
//     InvalidArgument), sets the expiry E (Unix milliseconds: its clock
//     plus the session lifetime), and answers with its public key
//     (enclave_share), E (expire_time) and a ticket.
//
//  3. Both derive the session key, 32 bytes:
//
//     HKDF-SHA256(secret = Z, salt = client_share + enclave_share,
//     info = "nitrosign-session-key-v1" + "\n" + caller + "\n" + E)
//
//     with caller the caller's key id (64 hex digits) and E in decimal.
//
// The ticket is opaque to the caller. It is 1 + 12 + 72 + 16 = 101 bytes:
// the version 0x01, a random 12-byte nonce, and the AES-256-GCM
// encryption under the enclave's ticket key (with associated data
// "nitrosign-ticket-v1") of the caller's key id (32 raw bytes), E (8
// bytes, big-endian) and the session key; the GCM tag last. The enclave
// keeps no session state: every enclave whose signer derives the same
// ticket key (the same keyset) accepts the ticket.
//
// A session call carries five metadata entries, each exactly once:
// nitrosign-caller, nitrosign-timestamp and nitrosign-nonce as above, and
//
//	nitrosign-session-bin  the ticket, exactly 101 raw bytes
//	nitrosign-mac-bin      HMAC-SHA256 under the session key of the MACed
//	                       bytes, exactly 32 raw bytes
//
// and no nitrosign-signature-bin (a call with both is malformed). The MACed
// bytes are the signed bytes of the call with "nitrosign-session-call-v1"
// in place of "nitrosign-call-v1" as their first line (MACedBytes).
//
// The enclave opens the ticket (a ticket it cannot open, of another
// version, or expired: ErrSessionInvalid, answered UNAUTHENTICATED with a
// google.rpc.ErrorInfo detail of domain "nitrosign.dev" and reason
// "SESSION_INVALID", on which the caller opens a new session and may send
// the call again), checks that its caller is the one nitrosign-caller
// names and that the MAC matches (ErrBadSignature), then the replay cache
// and the policy as for a signed call. Session.Authenticate makes the
// entries; SessionUnaryClientInterceptor opens, renews and reopens
// sessions for a client.
//
// # Checking a call, in the enclave
//
//  1. ParseMetadata: the entries, each exactly once and well formed
//     (ErrMissing when there are none at all, an anonymous call;
//     ErrMalformed otherwise).
//  2. Look the caller up by Claims.Caller in the policy; an unknown caller
//     is refused.
//  3. Claims.Verify (or VerifyDigest) with that caller's public key, the
//     method of the call and the request bytes received (ErrBadSignature);
//     for a session call (Claims.IsSession), Claims.VerifySession with
//     the enclave's TicketSealer instead.
//  4. Only then ReplayCache.Check: the timestamp is within the window of
//     the enclave's clock (ErrSkew) and the (caller, nonce) pair is new
//     (ErrReplay). Checking after the signature means that a call nobody
//     signed cannot fill the cache.
//
// What this does not do: it does not hide the call (the proxy still reads
// the request; TLS to the proxy and the enclave's attestation are separate
// matters), it does not authenticate the response, and a caller whose
// private key is stolen is the thief's until the policy drops it.
package callauth
