package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/internal/sigalg"
	"github.com/nitrosign/nitrosign/internal/target"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// RPC names the call a workload makes.
type RPC string

// The RPCs the benchmark drives.
const (
	// RPCEcho is EchoService/Echo with Workload.PayloadSize bytes.
	RPCEcho RPC = "echo"
	// RPCSign is SignerService/Sign with Workload's key, algorithm and
	// message.
	RPCSign RPC = "sign"
)

// Limits of a workload.
const (
	// MaxPayloadSize bounds the Echo payload (the enclave accepts 1 MiB
	// requests by default).
	MaxPayloadSize = 64 << 20
	// MaxRawMessageSize is the largest RAW message Sign takes.
	MaxRawMessageSize = 4096
)

// Workload is what each call sends. Start from DefaultWorkload.
type Workload struct {
	// RPC is echo or sign. Default echo.
	RPC RPC
	// PayloadSize is the Echo payload in bytes. Default 32.
	PayloadSize int
	// KeyType selects the signing key: rsa, ecc or ed25519. Default ecc.
	KeyType string
	// Algorithm is a KMS algorithm name (ECDSA_SHA_256, ...); empty means
	// the key's default.
	Algorithm string
	// MessageType is raw (the server hashes) or digest (the client sends
	// the hash). Default raw.
	MessageType string
	// MessageSize is the size in bytes of the message that is signed (RAW)
	// or hashed client-side (DIGEST). Default 32; at most 4096 for raw.
	MessageSize int
}

// DefaultWorkload returns the documented defaults.
func DefaultWorkload() Workload {
	return Workload{RPC: RPCEcho, PayloadSize: 32, KeyType: "ecc", MessageType: "raw", MessageSize: 32}
}

var keyTypes = map[string]pb.KeyType{
	"rsa":     pb.KeyType_KEY_TYPE_RSA,
	"ecc":     pb.KeyType_KEY_TYPE_ECC,
	"ed25519": pb.KeyType_KEY_TYPE_ED25519,
}

// Validate reports every invalid field, each with a precise message.
func (w Workload) Validate() error {
	_, err := w.build()
	return err
}

// call is a workload compiled into a request.
type call struct {
	method string
	req    proto.Message
	// reply allocates a response; check validates it.
	reply func() proto.Message
	check func(proto.Message) error
}

func (w Workload) build() (*call, error) {
	switch w.RPC {
	case RPCEcho:
		if w.PayloadSize < 0 || w.PayloadSize > MaxPayloadSize {
			return nil, fmt.Errorf("payload size %d: must be between 0 and %d bytes", w.PayloadSize, MaxPayloadSize)
		}
		payload := make([]byte, w.PayloadSize)
		for i := range payload {
			payload[i] = byte(i)
		}
		n := w.PayloadSize
		return &call{
			method: pb.EchoService_Echo_FullMethodName,
			req:    &pb.EchoRequest{Payload: payload},
			reply:  func() proto.Message { return new(pb.EchoResponse) },
			check: func(m proto.Message) error {
				if got := len(m.(*pb.EchoResponse).GetPayload()); got != n {
					return status.Errorf(codes.DataLoss, "echo returned %d bytes, sent %d", got, n)
				}
				return nil
			},
		}, nil
	case RPCSign:
		return w.buildSign()
	default:
		return nil, fmt.Errorf("rpc %q: want echo or sign", w.RPC)
	}
}

func (w Workload) buildSign() (*call, error) {
	var errs []error
	kt, ok := keyTypes[strings.ToLower(w.KeyType)]
	if !ok {
		errs = append(errs, fmt.Errorf("key type %q: want rsa, ecc or ed25519", w.KeyType))
	}
	var alg pb.SigningAlgorithm
	if w.Algorithm != "" {
		a, err := sigalg.Parse(w.Algorithm)
		if err != nil {
			errs = append(errs, fmt.Errorf("algorithm: %w", err))
		}
		alg = a
	}
	var mt pb.MessageType
	switch strings.ToLower(w.MessageType) {
	case "raw":
		mt = pb.MessageType_MESSAGE_TYPE_RAW
		if w.MessageSize < 0 || w.MessageSize > MaxRawMessageSize {
			errs = append(errs, fmt.Errorf("message size %d: a raw message is at most %d bytes", w.MessageSize, MaxRawMessageSize))
		}
	case "digest":
		mt = pb.MessageType_MESSAGE_TYPE_DIGEST
		if w.MessageSize < 0 || w.MessageSize > MaxPayloadSize {
			errs = append(errs, fmt.Errorf("message size %d: must be between 0 and %d bytes", w.MessageSize, MaxPayloadSize))
		}
	default:
		errs = append(errs, fmt.Errorf("message type %q: want raw or digest", w.MessageType))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	msg := make([]byte, w.MessageSize)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	if mt == pb.MessageType_MESSAGE_TYPE_DIGEST {
		// The digest must be the algorithm's hash; without an algorithm,
		// RSA and ECC keys default to SHA-256 (P-256's and RSA's default).
		h := alg
		if h == pb.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED {
			if kt == pb.KeyType_KEY_TYPE_ED25519 {
				return nil, errors.New("message type digest with an ed25519 key: give --algorithm ED25519_PH_SHA_512")
			}
			h = pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256
		}
		hash, ok := sigalg.Hash(h)
		if !ok || !hash.Available() {
			return nil, fmt.Errorf("algorithm %s takes no digest: use message type raw", sigalg.Name(h))
		}
		hh := hash.New()
		hh.Write(msg)
		msg = hh.Sum(nil)
	}
	return &call{
		method: pb.SignerService_Sign_FullMethodName,
		req: &pb.SignRequest{
			Key:              &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: kt}},
			Message:          msg,
			MessageType:      mt,
			SigningAlgorithm: alg,
		},
		reply: func() proto.Message { return new(pb.SignResponse) },
		check: func(m proto.Message) error {
			if len(m.(*pb.SignResponse).GetSignature()) == 0 {
				return status.Error(codes.DataLoss, "sign returned an empty signature")
			}
			return nil
		},
	}, nil
}

// String describes the workload for reports.
func (w Workload) String() string {
	if w.RPC == RPCSign {
		alg := w.Algorithm
		if alg == "" {
			alg = "default algorithm"
		}
		return fmt.Sprintf("sign, %s key, %s, %s message of %d B", strings.ToUpper(w.KeyType), alg, strings.ToLower(w.MessageType), w.MessageSize)
	}
	return fmt.Sprintf("echo, %d B payload", w.PayloadSize)
}

// NewRequest returns the request message the workload sends, for callers
// that make the call themselves (the in-process baseline).
func (w Workload) NewRequest() (proto.Message, error) {
	c, err := w.build()
	if err != nil {
		return nil, err
	}
	return proto.Clone(c.req), nil
}

// MaxCallMsgSize bounds the messages a benchmark connection sends and
// receives: large enough for the largest Echo payload.
const MaxCallMsgSize = MaxPayloadSize + 1<<10

// GRPCDialer returns a Dialer for addr (vsock://CID:PORT or tcp://HOST:PORT)
// whose connections make w's call. extra dial options are appended (e.g.
// TLS credentials). Every connection is its own grpc.ClientConn, so one
// connection is one transport connection.
func GRPCDialer(addr string, w Workload, extra ...grpc.DialOption) (Dialer, error) {
	t, err := target.Parse(addr)
	if err != nil {
		return nil, err
	}
	c, err := w.build()
	if err != nil {
		return nil, err
	}
	opts := append([]grpc.DialOption{
		grpc.WithContextDialer(t.Dialer()),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUserAgent("nitrosign-bench"),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxCallMsgSize), grpc.MaxCallSendMsgSize(MaxCallMsgSize)),
	}, extra...)
	return func(context.Context) (Conn, error) {
		cc, err := grpc.NewClient(t.GRPCTarget(), opts...)
		if err != nil {
			return nil, fmt.Errorf("connect to %s: %w", t, err)
		}
		return &grpcConn{cc: cc, call: c, target: t}, nil
	}, nil
}

// grpcConn is one grpc.ClientConn making one kind of call.
type grpcConn struct {
	cc     *grpc.ClientConn
	call   *call
	target target.Target
}

var (
	_ Conn      = (*grpcConn)(nil)
	_ Connector = (*grpcConn)(nil)
)

func (g *grpcConn) Call(ctx context.Context) error {
	reply := g.call.reply()
	if err := g.cc.Invoke(ctx, g.call.method, g.call.req, reply); err != nil {
		return err
	}
	return g.call.check(reply)
}

// Connect establishes the transport connection and waits until it is
// ready; it fails as soon as the first attempt does.
func (g *grpcConn) Connect(ctx context.Context) error {
	g.cc.Connect()
	for {
		s := g.cc.GetState()
		switch s {
		case connectivity.Ready:
			return nil
		case connectivity.TransientFailure:
			// The first attempt failed: say so now rather than retry
			// until the timeout.
			return fmt.Errorf("cannot reach %s (is it running?): connection failed", g.target)
		}
		if !g.cc.WaitForStateChange(ctx, s) {
			return fmt.Errorf("cannot reach %s (is it running?): still %s: %w", g.target, s, ctx.Err())
		}
	}
}

func (g *grpcConn) Close() error { return g.cc.Close() }
