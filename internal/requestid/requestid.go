// Package requestid carries one id per call from the host proxy to the
// enclave in gRPC metadata, so that a call's log lines on both sides can be
// joined.
//
// The proxy keeps a well-formed id a client sent (so a caller's own tracing
// id survives), and makes a new one otherwise; it forwards it upstream in
// the x-request-id header. The enclave only reads it: an id that is not
// well formed is logged as absent, never copied into a log line as is.
package requestid

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"

	"go.uber.org/zap"
	"google.golang.org/grpc/metadata"
)

// Key is the metadata key (gRPC metadata keys are lower case).
const Key = "x-request-id"

// MaxLen bounds an id accepted from a client: long enough for a UUID, a
// W3C trace id or a ULID with a prefix, short enough to keep log lines sane.
const MaxLen = 64

// LogField is the zap field name used on both sides.
const LogField = "request_id"

// Valid reports whether s is an acceptable id: 1 to MaxLen characters from
// [A-Za-z0-9._:-]. Anything else (spaces, control characters, quotes) could
// forge or garble log lines.
func Valid(s string) bool {
	if len(s) == 0 || len(s) > MaxLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '-', c == '_', c == '.', c == ':':
		default:
			return false
		}
	}
	return true
}

// New returns a fresh id: 16 random bytes in hex (32 characters). An id
// correlates log lines and needs to be unique, not secret: it comes from
// math/rand/v2's generator (ChaCha8, seeded per process by the runtime),
// not crypto/rand, which costs a getrandom syscall on every call on
// kernels without the vDSO one (the proxy and the enclave make one per
// call that arrives without an id).
func New() string {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], rand.Uint64())
	binary.LittleEndian.PutUint64(b[8:], rand.Uint64())
	return hex.EncodeToString(b[:])
}

// FromIncoming returns the id in ctx's incoming metadata if there is
// exactly one and it is Valid.
func FromIncoming(ctx context.Context) (string, bool) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return "", false
	}
	v := md.Get(Key)
	if len(v) != 1 || !Valid(v[0]) {
		return "", false
	}
	return v[0], true
}

type ctxKey struct{}

// Ensure returns ctx with a request id: the client's when it is Valid,
// else a new one. The id is written into ctx's incoming metadata (replacing
// whatever the client sent under Key), so code that forwards incoming
// metadata forwards the id, and it is stored for FromContext.
func Ensure(ctx context.Context) (context.Context, string) {
	id, ok := FromIncoming(ctx)
	if !ok {
		id = New()
	}
	md, _ := metadata.FromIncomingContext(ctx)
	md = md.Copy()
	md.Set(Key, id)
	ctx = metadata.NewIncomingContext(ctx, md)
	return context.WithValue(ctx, ctxKey{}, id), id
}

// FromContext returns the id Ensure stored, or a Valid one in the incoming
// metadata (the enclave's case), or "".
func FromContext(ctx context.Context) string {
	if id, ok := ctx.Value(ctxKey{}).(string); ok {
		return id
	}
	id, _ := FromIncoming(ctx)
	return id
}

// Field is the call's id as a zap field; zap.Skip() when there is none.
func Field(ctx context.Context) zap.Field {
	if id := FromContext(ctx); id != "" {
		return zap.String(LogField, id)
	}
	return zap.Skip()
}
