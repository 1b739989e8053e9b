package authz_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/internal/callauth"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// sessionDialer dials connections that share one session interceptor (as
// a client's pool does) and counts the OpenSession calls it makes (an
// interceptor after it sees them).
type sessionDialer struct {
	auth  grpc.UnaryClientInterceptor
	opens atomic.Int32
}

func newSessionDialer(id *callauth.Identity) *sessionDialer {
	return &sessionDialer{auth: callauth.SessionUnaryClientInterceptor(id, nil)}
}

func (d *sessionDialer) dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	count := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if method == callauth.OpenSessionMethod {
			d.opens.Add(1)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(d.auth, count))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// Calls in a session: one OpenSession, then every call by MAC, with the
// policy applied to each as to signed calls.
func TestSessions(t *testing.T) {
	addr, payments, ops, _ := setup(t)
	ecdsa256 := pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256
	d := newSessionDialer(payments)
	pc := pb.NewSignerServiceClient(d.dial(t, addr))
	for i := 0; i < 20; i++ {
		if _, err := pc.Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, ecdsa256)); err != nil {
			t.Fatalf("call %d in a session: %v", i, err)
		}
	}
	if n := d.opens.Load(); n != 1 {
		t.Fatalf("%d sessions opened for 20 calls, want 1", n)
	}
	_, err := pc.Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_RSA, 0))
	wantCode(t, "payments with the RSA key, in a session", err, codes.PermissionDenied, `caller "payments" may not sign with key`)

	od := newSessionDialer(ops)
	_, err = pb.NewKeyAdminServiceClient(od.dial(t, addr)).CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ECC})
	wantCode(t, "ops administering ephemeral keys in a session", err, codes.FailedPrecondition, "ephemeral")

	// A caller the policy does not know opens no session.
	ud := newSessionDialer(identity(t, "ed25519"))
	_, err = pb.NewSignerServiceClient(ud.dial(t, addr)).Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, ecdsa256))
	wantCode(t, "an unknown caller opening a session", err, codes.Unauthenticated, "unknown caller")
}

// Session calls tampered with, replayed, or made with another enclave's
// ticket are refused, each with its precise status; OpenSession cannot be
// made in a session, nor anonymously.
func TestSessionCallsRefused(t *testing.T) {
	addr, payments, _, raw := setup(t)
	cc := dial(t, addr, nil)
	method := pb.SignerService_Sign_FullMethodName
	req := signReq(pb.KeyType_KEY_TYPE_ECC, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256)
	body, err := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	s, err := callauth.OpenSession(ctx(t), cc, payments)
	if err != nil {
		t.Fatal(err)
	}
	auth := func(s *callauth.Session, method string, msg []byte, at time.Time) metadata.MD {
		md, err := s.Authenticate(method, msg, at)
		if err != nil {
			t.Fatal(err)
		}
		return md
	}
	md := auth(s, method, body, time.Now())
	if err := rawCall(t, cc, method, md, req); err != nil {
		t.Fatalf("a session call: %v", err)
	}
	wantCode(t, "the same session call again", rawCall(t, cc, method, md, req), codes.Unauthenticated, "replayed")
	other := proto.Clone(req).(*pb.SignRequest)
	other.Message = []byte("pay 900 to alice")
	wantCode(t, "a MAC over another body", rawCall(t, cc, method, auth(s, method, body, time.Now()), other), codes.Unauthenticated, "session MAC does not match")
	wantCode(t, "an expired timestamp", rawCall(t, cc, method, auth(s, method, body, time.Now().Add(-10*time.Minute)), req), codes.Unauthenticated, "outside the window")

	// OpenSession in a session: refused (a session cannot extend itself).
	offer, err := callauth.NewSessionOffer()
	if err != nil {
		t.Fatal(err)
	}
	oreq := &pb.OpenSessionRequest{ClientShare: offer.Share()}
	obody, err := proto.MarshalOptions{Deterministic: true}.Marshal(oreq)
	if err != nil {
		t.Fatal(err)
	}
	var oresp pb.OpenSessionResponse
	err = cc.Invoke(metadata.NewOutgoingContext(ctx(t), auth(s, callauth.OpenSessionMethod, obody, time.Now())), callauth.OpenSessionMethod, oreq, &oresp)
	wantCode(t, "OpenSession in a session", err, codes.Unauthenticated, "must be signed with the caller's identity key")
	err = cc.Invoke(ctx(t), callauth.OpenSessionMethod, oreq, &oresp)
	wantCode(t, "an anonymous OpenSession", err, codes.Unauthenticated, "carries no caller signature")
	// A malformed share, signed: InvalidArgument.
	bad := &pb.OpenSessionRequest{ClientShare: []byte("short")}
	bbody, err := proto.MarshalOptions{Deterministic: true}.Marshal(bad)
	if err != nil {
		t.Fatal(err)
	}
	smd, err := callauth.Sign(payments, callauth.OpenSessionMethod, bbody, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	err = cc.Invoke(metadata.NewOutgoingContext(ctx(t), smd), callauth.OpenSessionMethod, bad, &oresp)
	wantCode(t, "OpenSession with a short share", err, codes.InvalidArgument, "client_share")

	// Another enclave (other ephemeral keys, the same policy) does not
	// accept this enclave's ticket: UNAUTHENTICATED with the
	// SESSION_INVALID detail that tells a client to open a new session.
	addr2 := startWithPolicy(t, raw)
	err = rawCall(t, dial(t, addr2, nil), method, auth(s, method, body, time.Now()), req)
	wantCode(t, "another enclave's ticket", err, codes.Unauthenticated, "not issued by an enclave with these keys")
	if !callauth.IsSessionInvalid(err) {
		t.Fatalf("another enclave's ticket: %v has no SESSION_INVALID detail", err)
	}
	if err := rawCall(t, cc, method, auth(s, method, body, time.Now()), req); err != nil {
		t.Fatalf("the enclave stopped serving after the refusals: %v", err)
	}
}

func startWithPolicy(t *testing.T, raw []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "policy.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	c := enclavetest.DefaultConfig()
	c.Authz.DevAllowAnonymous = false
	c.Authz.PolicyFile = path
	return enclavetest.Start(t, c, 0).Addr
}

// A client whose calls reach two enclaves with different keys (one
// interceptor on two connections, as the pool spreads calls) gets every
// call through: a ticket refused by the other enclave opens a new session
// and the call is sent once more.
func TestSessionReopenedOnAnotherEnclave(t *testing.T) {
	addr, payments, _, raw := setup(t)
	addr2 := startWithPolicy(t, raw)
	d := newSessionDialer(payments)
	a := pb.NewSignerServiceClient(d.dial(t, addr))
	b := pb.NewSignerServiceClient(d.dial(t, addr2))
	req := signReq(pb.KeyType_KEY_TYPE_ECC, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256)
	for i, cl := range []pb.SignerServiceClient{a, a, b, b, a} {
		if _, err := cl.Sign(ctx(t), req); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	// a: open; b: refused, open; a: refused, open.
	if n := d.opens.Load(); n != 3 {
		t.Fatalf("%d sessions opened, want 3", n)
	}
}

// An enclave that offers no sessions (no SessionService: a server of an
// older release) gets every call signed instead.
func TestSessionFallsBackToSignatures(t *testing.T) {
	addr, payments, _, _ := setup(t)
	d := newSessionDialer(payments)
	refuse := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if method == callauth.OpenSessionMethod {
			return statusUnimplemented()
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	var signed atomic.Int32
	seen := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if md, _ := metadata.FromOutgoingContext(ctx); len(md.Get(callauth.MDSignature)) == 1 {
			signed.Add(1)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(d.auth, refuse, seen))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	for i := 0; i < 3; i++ {
		if _, err := pb.NewSignerServiceClient(cc).Sign(ctx(t), signReq(pb.KeyType_KEY_TYPE_ECC, 0)); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	if n := signed.Load(); n != 3 {
		t.Fatalf("%d of 3 calls signed", n)
	}
}

func statusUnimplemented() error {
	return status.Error(codes.Unimplemented, "unknown service nitrosign.v1.SessionService")
}
