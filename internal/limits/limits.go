// Package limits holds the guards both gRPC servers, the enclave signer and
// the host proxy, put in front of their handlers so that load, faults and
// hostile peers cannot exhaust them:
//
//   - InFlight bounds the calls being served at once and sheds the excess at
//     once with codes.ResourceExhausted: no unbounded queue builds up
//     anywhere, and a client learns immediately that it must back off.
//   - DefaultDeadline gives a unary call that arrived without a deadline one,
//     so a call can never run (or wait on a stalled peer) forever.
//   - CheckMetadata bounds the request metadata a call may carry, with a
//     precise ResourceExhausted below the transport's own hard limit, and
//     refuses entries gRPC does not allow with InvalidArgument.
//   - Listener bounds the connections open at once: one beyond the bound is
//     accepted and closed at once.
//   - Conns serves a bounded listener's connections (the parent's small
//     servers: enclave logs, the KMS forwarder) and ends them on Close.
//
// The server packages configure them (enclave/server, host/proxy) and map
// their outcome to logs and metrics; nothing here logs.
package limits

import (
	"context"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// HealthPrefix is the method prefix of grpc.health.v1.Health. Health calls
// are exempt from the in-flight bound: they are cheap, and a health check
// that failed under load would make a load balancer, or the host proxy's
// pool (grpc-go backs off for up to two minutes after a failed health
// Watch), take a busy server for a dead one.
const HealthPrefix = "/grpc.health.v1.Health/"

// Exempt reports whether method is not counted by InFlight.
func Exempt(method string) bool { return strings.HasPrefix(method, HealthPrefix) }

// InFlight is a non-blocking bound on calls in flight. A call beyond the
// bound is refused at once with codes.ResourceExhausted; there is no queue.
// It is safe for concurrent use.
type InFlight struct {
	who   string
	limit int64
	n     atomic.Int64
	shed  atomic.Uint64
	// onShed, if set, is called (on the call's goroutine) for every call
	// refused; it must be quick.
	onShed func()
}

// NewInFlight bounds calls to limit (>= 1). who names the server in the
// refusal message ("enclave", "proxy").
func NewInFlight(who string, limit int, onShed func()) *InFlight {
	if limit < 1 {
		limit = 1
	}
	return &InFlight{who: who, limit: int64(limit), onShed: onShed}
}

// Acquire takes a slot, or returns the ResourceExhausted status to answer
// with. Every successful Acquire must be paired with one Release.
func (l *InFlight) Acquire() error {
	n := l.n.Add(1)
	if n <= l.limit {
		return nil
	}
	l.n.Add(-1)
	l.shed.Add(1)
	if l.onShed != nil {
		l.onShed()
	}
	return status.Errorf(codes.ResourceExhausted,
		"%s busy: %d calls in flight, limit %d; retry with backoff", l.who, n-1, l.limit)
}

// Release frees a slot taken by Acquire.
func (l *InFlight) Release() { l.n.Add(-1) }

// Current is the number of calls in flight now.
func (l *InFlight) Current() int64 { return l.n.Load() }

// Limit is the bound.
func (l *InFlight) Limit() int64 { return l.limit }

// Shed is the number of calls refused so far.
func (l *InFlight) Shed() uint64 { return l.shed.Load() }

// UnaryInterceptor bounds unary calls (health calls are exempt).
func (l *InFlight) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if Exempt(info.FullMethod) {
			return h(ctx, req)
		}
		if err := l.Acquire(); err != nil {
			return nil, err
		}
		defer l.Release()
		return h(ctx, req)
	}
}

// StreamInterceptor bounds streams, for their whole life (health streams
// are exempt).
func (l *InFlight) StreamInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if Exempt(info.FullMethod) {
			return h(srv, ss)
		}
		if err := l.Acquire(); err != nil {
			return err
		}
		defer l.Release()
		return h(srv, ss)
	}
}

// WithDefaultDeadline returns ctx with a deadline d from now when it has
// none, and ctx itself otherwise. cancel is never nil.
func WithDefaultDeadline(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || d <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

// DefaultDeadline gives unary calls that came without a deadline one of d.
// Streams are left alone: a health Watch or any other long-lived stream
// must be able to live as long as its caller wants.
func DefaultDeadline(d time.Duration) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		ctx, cancel := WithDefaultDeadline(ctx, d)
		defer cancel()
		return h(ctx, req)
	}
}

// hpackEntryOverhead is what HTTP/2 adds to each header field when it
// accounts a header list (RFC 7541 section 4.1, RFC 9113 section 6.5.2).
const hpackEntryOverhead = 32

// MetadataSize is the size of md as HTTP/2 accounts a header list: for each
// value, the key's and the value's length plus 32.
func MetadataSize(md metadata.MD) int {
	n := 0
	for k, vs := range md {
		for _, v := range vs {
			n += len(k) + len(v) + hpackEntryOverhead
		}
	}
	return n
}

// CheckMetadata checks the incoming metadata of ctx: ResourceExhausted when
// it is larger than limit bytes (MetadataSize), InvalidArgument when an
// entry breaks gRPC's rules (ValidateMetadata), nil otherwise.
func CheckMetadata(ctx context.Context, limit int) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if n := MetadataSize(md); n > limit {
		return status.Errorf(codes.ResourceExhausted,
			"request metadata is %d bytes (names + values + 32 per entry), limit %d", n, limit)
	}
	return ValidateMetadata(md)
}

// ValidateMetadata returns InvalidArgument for the first entry of md that
// breaks the gRPC spec's rules (PROTOCOL-HTTP2.md, Custom-Metadata): a key
// of characters other than 0-9 a-z - _ . , or a value of a key not ending
// in -bin with bytes outside printable ASCII (0x20-0x7E): invalid UTF-8,
// any non-ASCII text, control characters. grpc-go's server lets such
// entries through, but its client refuses to send them with Internal: the
// proxy would fail to forward them upstream with that Internal, which would
// blame the server for the caller's mistake. The message names the key,
// quoted, never the value. Pseudo-headers (":authority") are skipped.
func ValidateMetadata(md metadata.MD) error {
	for k, vs := range md {
		if len(vs) == 0 {
			if err := ValidateEntry(k, ""); err != nil {
				return err
			}
		}
		for _, v := range vs {
			if err := ValidateEntry(k, v); err != nil {
				return err
			}
		}
	}
	return nil
}

// ValidateEntry is ValidateMetadata for one entry: key k (lower case, as
// HTTP/2 carries it) with value v.
func ValidateEntry(k, v string) error {
	if k == "" {
		return status.Error(codes.InvalidArgument, "request metadata has an empty key")
	}
	if k[0] == ':' {
		return nil
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' && c != '_' && c != '.' {
			return status.Errorf(codes.InvalidArgument,
				"request metadata key %q: only 0-9 a-z - _ . are allowed in keys", k)
		}
	}
	if strings.HasSuffix(k, "-bin") {
		return nil
	}
	for i := 0; i < len(v); i++ {
		if v[i] < 0x20 || v[i] > 0x7e {
			return status.Errorf(codes.InvalidArgument,
				"request metadata key %q: value is not printable ASCII (0x20-0x7E); send binary values under a key ending in -bin", k)
		}
	}
	return nil
}

// MetadataUnary refuses unary calls whose metadata exceeds limit bytes or
// is invalid (CheckMetadata).
func MetadataUnary(limit int) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if err := CheckMetadata(ctx, limit); err != nil {
			return nil, err
		}
		return h(ctx, req)
	}
}

// MetadataStream is MetadataUnary for streams.
func MetadataStream(limit int) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if err := CheckMetadata(ss.Context(), limit); err != nil {
			return err
		}
		return h(srv, ss)
	}
}
