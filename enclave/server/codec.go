package server

import (
	"context"
	"crypto/sha256"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	protov2 "google.golang.org/protobuf/proto"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// requestCodec is the standard proto codec, except that a request whose
// bytes do not parse is reported to the caller as InvalidArgument. grpc-go
// answers a decode failure with Internal (rpc_util.go: "failed to unmarshal
// the received message"), which would blame the server for a caller's
// mistake. The codec cannot return a status itself (grpc-go rewraps it), so
// it remembers the failure for the request value and the interceptors
// below, which see that same value, turn it into the status.
type requestCodec struct {
	base encoding.CodecV2
}

var _ encoding.CodecV2 = requestCodec{}

// malformed maps a request value that failed to decode to its parse error.
// Entries live from decode to the first interceptor, a few microseconds.
var malformed sync.Map

func newRequestCodec() requestCodec {
	return requestCodec{base: encoding.GetCodecV2(proto.Name)}
}

func (c requestCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }

func (c requestCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.base.Unmarshal(data, v)
	if err == nil {
		if needsDigest(v) {
			h := sha256.New()
			for _, b := range data {
				h.Write(b.ReadOnlyData())
			}
			var sum [sha256.Size]byte
			h.Sum(sum[:0])
			digests.Store(v, sum)
		}
		return nil
	}
	m, ok := v.(protov2.Message)
	if !ok {
		return err
	}
	protov2.Reset(m)
	malformed.Store(v, err)
	return nil
}

func (c requestCodec) Name() string { return c.base.Name() }

// digests maps a decoded request that callers must sign (callauth) to the
// SHA-256 of its bytes as they arrived, which is what the caller signed:
// re-encoding the decoded message could give other bytes. Entries live
// from decode to unaryMalformed, which runs before any interceptor that
// may refuse the call and always takes them (into the call's context).
var digests sync.Map

// needsDigest reports whether v is a request of a method that callers
// must sign: Sign and KeyAdminService.
func needsDigest(v any) bool {
	switch v.(type) {
	case *pb.SignRequest, *pb.CreateKeyRequest, *pb.DisableKeyRequest, *pb.EnableKeyRequest, *pb.OpenSessionRequest:
		return true
	}
	return false
}

// requestDigest takes the digest recorded for req.
func requestDigest(req any) ([sha256.Size]byte, bool) {
	v, ok := digests.LoadAndDelete(req)
	if !ok {
		return [sha256.Size]byte{}, false
	}
	return v.([sha256.Size]byte), true
}

func malformedError(req any) error {
	if v, ok := malformed.LoadAndDelete(req); ok {
		return status.Errorf(codes.InvalidArgument, "malformed request: not a valid protobuf message: %v", v)
	}
	return nil
}

// digestKey is the context key of a request's digest (requestDigest).
type digestKey struct{}

// unaryMalformed answers a request that did not decode, and moves the
// digest of one that did from the codec's table into the call's context
// (digestFrom), so that no entry outlives its call whatever refuses it.
func unaryMalformed(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := malformedError(req); err != nil {
		return nil, err
	}
	if d, ok := requestDigest(req); ok {
		ctx = context.WithValue(ctx, digestKey{}, d)
	}
	return handler(ctx, req)
}

// digestFrom is the digest unaryMalformed put in ctx.
func digestFrom(ctx context.Context) ([sha256.Size]byte, bool) {
	d, ok := ctx.Value(digestKey{}).([sha256.Size]byte)
	return d, ok
}

func streamMalformed(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, malformedStream{ss})
}

type malformedStream struct{ grpc.ServerStream }

func (s malformedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return malformedError(m)
}
