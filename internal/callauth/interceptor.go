package callauth

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// The methods the enclave wants signed (DefaultMethods).
const (
	// SignMethod is SignerService.Sign.
	SignMethod = pb.SignerService_Sign_FullMethodName
	// KeyAdminPrefix begins every KeyAdminService method (tested against
	// the generated service description).
	KeyAdminPrefix = "/nitrosign.v1.KeyAdminService/"
	// OpenSessionMethod is SessionService.OpenSession, always signed with
	// the caller's identity key.
	OpenSessionMethod = pb.SessionService_OpenSession_FullMethodName
)

// DefaultMethods reports whether method is one the enclave authenticates:
// SignerService.Sign, SessionService.OpenSession and every
// KeyAdminService method. Other methods (Echo, ListKeys, GetPublicKey,
// Attest, health) are public.
func DefaultMethods(method string) bool {
	return method == SignMethod || method == OpenSessionMethod || strings.HasPrefix(method, KeyAdminPrefix)
}

// UnaryClientInterceptor signs the unary calls for which methods returns
// true (nil: DefaultMethods) with id, and passes the others through
// untouched. For a signed call it encodes the request once, with
// deterministic protobuf encoding, signs exactly those bytes and sends
// exactly those bytes: the call's codec (grpc.ForceCodecV2, named "proto",
// so that the server decodes with its proto codec as for any call: the
// content type is application/grpc+proto) sends the encoded request as it is
// and leaves everything else, the response included, to gRPC's proto
// codec. It replaces any nitrosign-* entries already in the outgoing
// metadata with the four of Sign.
//
// Install it last (innermost) when a client has several interceptors, so
// that a retrying interceptor outside it signs each attempt anew: a call
// sent twice with the same nonce is refused the second time. A nil id
// makes every call that needs signing fail.
func UnaryClientInterceptor(id *Identity, methods func(method string) bool) grpc.UnaryClientInterceptor {
	if methods == nil {
		methods = DefaultMethods
	}
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if !methods(method) {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		if id == nil {
			return fmt.Errorf("callauth: %s must be signed, and the client has no identity", method)
		}
		codec, err := encodeRequest(req)
		if err != nil {
			return fmt.Errorf("callauth: %s: %w", method, err)
		}
		md, err := Sign(id, method, codec.data, time.Now())
		if err != nil {
			return fmt.Errorf("callauth: %s: %w", method, err)
		}
		ctx = withMetadata(ctx, md)
		opts = append(opts[:len(opts):len(opts)], grpc.ForceCodecV2(codec))
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

// encodeRequest encodes req deterministically and returns the codec that
// will send those bytes for it.
func encodeRequest(req any) (*signedCodec, error) {
	var m proto.Message
	switch v := req.(type) {
	case proto.Message:
		m = v
	case protoadapt.MessageV1:
		m = protoadapt.MessageV2Of(v)
	default:
		return nil, fmt.Errorf("request of type %T is not a protobuf message", req)
	}
	if t := reflect.TypeOf(req); !t.Comparable() {
		// signedCodec recognises the request by ==.
		return nil, fmt.Errorf("request of type %s is not comparable", t)
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode request: %w", err)
	}
	return &signedCodec{req: req, data: b}, nil
}

// withMetadata returns ctx with md in its outgoing metadata, replacing
// entries of the same names.
func withMetadata(ctx context.Context, md metadata.MD) context.Context {
	out, ok := metadata.FromOutgoingContext(ctx) // a copy
	if !ok {
		return metadata.NewOutgoingContext(ctx, md)
	}
	for k, v := range md {
		out[k] = v
	}
	return metadata.NewOutgoingContext(ctx, out)
}

// signedCodec is the codec of one signed call: it marshals the request it
// was made for (the very value, compared with ==) to the bytes that were
// signed, and hands everything else to gRPC's proto codec.
type signedCodec struct {
	req  any
	data []byte
}

var _ encoding.CodecV2 = (*signedCodec)(nil)

// protoCodec is gRPC's proto codec, registered by its package's init.
var protoCodec = encoding.GetCodecV2(grpcproto.Name)

var errNoProtoCodec = errors.New("callauth: gRPC's proto codec is not registered")

func (c *signedCodec) Marshal(v any) (mem.BufferSlice, error) {
	if v == c.req {
		// SliceBuffer: the bytes are not pooled, gRPC never frees them.
		return mem.BufferSlice{mem.SliceBuffer(c.data)}, nil
	}
	if protoCodec == nil {
		return nil, errNoProtoCodec
	}
	return protoCodec.Marshal(v)
}

func (c *signedCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if protoCodec == nil {
		return errNoProtoCodec
	}
	return protoCodec.Unmarshal(data, v)
}

// Name is the proto codec's, so the call's content type stays
// application/grpc+proto (or what CallContentSubtype says).
func (c *signedCodec) Name() string { return grpcproto.Name }
