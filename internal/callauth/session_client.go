package callauth

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// ErrorDomain and SessionInvalidReason name, in a google.rpc.ErrorInfo
// detail of an UNAUTHENTICATED status, a session call refused because the
// enclave does not accept its ticket (ErrSessionInvalid): the caller opens
// a new session and may send the call again, which was not acted on.
const (
	ErrorDomain          = "nitrosign.dev"
	SessionInvalidReason = "SESSION_INVALID"
)

// SessionInvalidStatus is the status of a call refused for
// ErrSessionInvalid: UNAUTHENTICATED, msg, and the ErrorInfo detail that
// SessionUnaryClientInterceptor recognises.
func SessionInvalidStatus(msg string) *status.Status {
	st := status.New(codes.Unauthenticated, msg)
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: SessionInvalidReason, Domain: ErrorDomain}); err == nil {
		return d
	}
	return st
}

// IsSessionInvalid reports whether err is a status made by
// SessionInvalidStatus.
func IsSessionInvalid(err error) bool {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unauthenticated {
		return false
	}
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok && ei.GetDomain() == ErrorDomain && ei.GetReason() == SessionInvalidReason {
			return true
		}
	}
	return false
}

// ClientInterceptor authenticates the calls DefaultMethods names as id:
// in a session (SessionUnaryClientInterceptor), or each call signed
// (UnaryClientInterceptor) when signEachCall.
func ClientInterceptor(id *Identity, signEachCall bool) grpc.UnaryClientInterceptor {
	if signEachCall {
		return UnaryClientInterceptor(id, nil)
	}
	return SessionUnaryClientInterceptor(id, nil)
}

// minSessionUse is the shortest time a session is used before it is
// renewed, whatever the clocks say.
const minSessionUse = time.Minute

// SessionUnaryClientInterceptor authenticates the unary calls for which
// methods returns true (nil: DefaultMethods) as id, with a session: the
// first such call opens one (OpenSession, through the interceptors after
// this one), and the calls that follow carry its
// ticket and a MAC (Session.Authenticate), which the enclave checks for a
// fraction of a signature's cost. The session is renewed when nine tenths
// of its life have passed, and opened again, with the call sent once more,
// when the enclave does not accept it (IsSessionInvalid: another enclave
// behind the proxy with other keys, an enclave restarted with ephemeral
// keys). A server without SessionService (UNIMPLEMENTED) gets every call
// signed instead. One session is shared by every connection the
// interceptor is installed on.
//
// As with UnaryClientInterceptor, install it last (innermost), and a nil
// id makes every call that needs authenticating fail.
func SessionUnaryClientInterceptor(id *Identity, methods func(method string) bool) grpc.UnaryClientInterceptor {
	if methods == nil {
		methods = DefaultMethods
	}
	sign := UnaryClientInterceptor(id, methods)
	st := &sessions{id: id, lock: make(chan struct{}, 1)}
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if !methods(method) {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		if id == nil || method == OpenSessionMethod || st.unsupported.Load() {
			return sign(ctx, method, req, reply, cc, invoker, opts...)
		}
		codec, err := encodeRequest(req)
		if err != nil {
			return fmt.Errorf("callauth: %s: %w", method, err)
		}
		open := func(ctx context.Context, req, resp any, opts ...grpc.CallOption) error {
			// The rest of the chain, without this call's options: the
			// session is opened for every call to come.
			return invoker(ctx, OpenSessionMethod, req, resp, cc, opts...)
		}
		callOpts := append(opts[:len(opts):len(opts)], grpc.ForceCodecV2(codec))
		for attempt := 0; ; attempt++ {
			s, err := st.get(ctx, open)
			if errors.Is(err, errNoSessions) {
				return sign(ctx, method, req, reply, cc, invoker, opts...)
			}
			if err != nil {
				return err
			}
			md, err := s.Authenticate(method, codec.data, time.Now())
			if err != nil {
				return fmt.Errorf("callauth: %s: %w", method, err)
			}
			err = invoker(withMetadata(ctx, md), method, req, reply, cc, callOpts...)
			if attempt == 0 && IsSessionInvalid(err) {
				// Refused before anything was done: a new session, once.
				st.drop(s)
				continue
			}
			return err
		}
	}
}

// errNoSessions: the server has no SessionService.
var errNoSessions = errors.New("callauth: the server does not offer sessions")

// sessions is the session of one interceptor.
type sessions struct {
	id          *Identity
	cur         atomic.Pointer[liveSession]
	unsupported atomic.Bool
	lock        chan struct{} // held while a session is being opened
}

type liveSession struct {
	*Session
	renewAt time.Time
}

func (st *sessions) valid() *Session {
	if s := st.cur.Load(); s != nil && time.Now().Before(s.renewAt) {
		return s.Session
	}
	return nil
}

// get returns the session, opening one with invoke when there is none or
// it is due for renewal; one call opens it while the others wait (or give
// up with their context).
func (st *sessions) get(ctx context.Context, invoke invokeFunc) (*Session, error) {
	if s := st.valid(); s != nil {
		return s, nil
	}
	select {
	case st.lock <- struct{}{}:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	defer func() { <-st.lock }()
	if s := st.valid(); s != nil {
		return s, nil
	}
	opened := time.Now()
	s, err := openSession(ctx, st.id, invoke)
	if status.Code(err) == codes.Unimplemented {
		st.unsupported.Store(true)
		return nil, errNoSessions
	}
	if err != nil {
		return nil, err
	}
	// Renewed after nine tenths of its life by our clock, at least a
	// minute after it was opened whatever the two clocks say (a call on
	// an expired session is refused, and opens a new one).
	use := s.expiry.Sub(opened) * 9 / 10
	st.cur.Store(&liveSession{Session: s, renewAt: opened.Add(max(use, minSessionUse))})
	return s, nil
}

// drop forgets s, unless another call replaced it already.
func (st *sessions) drop(s *Session) {
	if cur := st.cur.Load(); cur != nil && cur.Session == s {
		st.cur.CompareAndSwap(cur, nil)
	}
}

// invokeFunc sends an OpenSession call.
type invokeFunc func(ctx context.Context, req, resp any, opts ...grpc.CallOption) error

// OpenSession opens a session of id over cc: a SessionService.OpenSession
// call signed with id (whatever interceptors cc has). Errors from the
// enclave keep their status code. SessionUnaryClientInterceptor does this
// by itself; OpenSession is for a client that manages its session, with
// Session.Authenticate.
func OpenSession(ctx context.Context, cc grpc.ClientConnInterface, id *Identity, opts ...grpc.CallOption) (*Session, error) {
	return openSession(ctx, id, func(ctx context.Context, req, resp any, more ...grpc.CallOption) error {
		return cc.Invoke(ctx, OpenSessionMethod, req, resp, append(opts[:len(opts):len(opts)], more...)...)
	})
}

func openSession(ctx context.Context, id *Identity, invoke invokeFunc) (*Session, error) {
	if id == nil {
		return nil, errors.New("callauth: open a session: nil identity")
	}
	offer, err := NewSessionOffer()
	if err != nil {
		return nil, err
	}
	req := &pb.OpenSessionRequest{ClientShare: offer.Share()}
	codec, err := encodeRequest(req)
	if err != nil {
		return nil, fmt.Errorf("callauth: open a session: %w", err)
	}
	md, err := Sign(id, OpenSessionMethod, codec.data, time.Now())
	if err != nil {
		return nil, fmt.Errorf("callauth: open a session: %w", err)
	}
	resp := &pb.OpenSessionResponse{}
	if err := invoke(withMetadata(ctx, md), req, resp, grpc.ForceCodecV2(codec)); err != nil {
		if s, ok := status.FromError(err); ok {
			return nil, status.Errorf(s.Code(), "open a session as caller %s: %s", id.KeyID(), s.Message())
		}
		return nil, fmt.Errorf("callauth: open a session as caller %s: %w", id.KeyID(), err)
	}
	if !resp.GetExpireTime().IsValid() {
		return nil, errors.New("callauth: the enclave's session has no valid expire_time")
	}
	return offer.Finish(id.KeyID(), resp.GetEnclaveShare(), resp.GetTicket(), resp.GetExpireTime().AsTime())
}
