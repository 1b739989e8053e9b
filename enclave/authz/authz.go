package authz

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Defaults of Config, and the replay cache's size.
const (
	// DefaultMaxSkew: EC2 instances and the enclave's hypervisor clock
	// keep time within milliseconds (Amazon Time Sync); 30 s leaves room
	// for a badly synchronised client without keeping a recorded call good
	// for long.
	DefaultMaxSkew = 30 * time.Second
	// ReplayCapacity is how many signed calls one generation of the replay
	// cache remembers (callauth.NewReplayCache): 32 MiB allocated at
	// start, and with DefaultMaxSkew a sustained 2^20 / 60 s = 17,476
	// authenticated calls a second (docs/AUTHZ.md); beyond it calls are
	// refused with ResourceExhausted until the generation ends.
	ReplayCapacity = 1 << 20
)

// Config is how the enclave authorises its callers. In an enclave it
// comes from Dockerfile.enclave's ENTRYPOINT (measured).
type Config struct {
	// PolicyFile is the caller policy (--policy). Empty: no policy, so no
	// caller may sign, unless DevAllowAnonymous.
	PolicyFile string
	// DevAllowAnonymous, DEVELOPMENT ONLY, lets a call that carries no
	// caller signature sign and administer keys (a loud warning at
	// start). Signed calls are still checked against the policy. The
	// enclave refuses it without the simulated NSM.
	DevAllowAnonymous bool
	// MaxSkew is how far a call's timestamp may be from the enclave's
	// clock (the hypervisor's), either way; nonces are remembered for
	// twice that. Default 30s.
	MaxSkew time.Duration
	// SessionLifetime is how long a caller's session ticket is accepted
	// (SessionService.OpenSession). Default 1h.
	SessionLifetime time.Duration
}

// Validate reports what is wrong with c.
func (c Config) Validate() error {
	if c.MaxSkew < 0 || c.MaxSkew > time.Hour {
		return fmt.Errorf("--auth-max-skew %s: want 0 (default %s) to 1h", c.MaxSkew, DefaultMaxSkew)
	}
	if c.SessionLifetime != 0 && (c.SessionLifetime < time.Minute || c.SessionLifetime > 24*time.Hour) {
		return fmt.Errorf("--session-lifetime %s: want 0 (default %s) or 1m to 24h", c.SessionLifetime, callauth.DefaultSessionLifetime)
	}
	return nil
}

// Decision is one authorisation decision, for the audit log: never the
// message, only its SHA-256.
type Decision struct {
	Time          time.Time
	Caller        string // the policy's name; "anonymous" for development calls
	CallerID      string // the caller's key id; empty when anonymous
	Method        string
	KeyID         string // the key selected (Sign), when known
	Algorithm     string
	MessageSHA256 [sha256.Size]byte // of SignRequest.message (the message or its digest)
	Allowed       bool
	Code          codes.Code
	Reason        string
}

// Recorder keeps decisions (the audit log). Record must not block for
// long; an error means the decision cannot be kept, and the call is then
// refused: nothing is signed that the audit log does not hold.
type Recorder interface {
	Record(Decision) error
}

// Authorizer authenticates and authorises Sign and KeyAdminService calls.
type Authorizer struct {
	cfg    Config
	policy *Policy // nil: none
	signer *signer.Signer
	replay *callauth.ReplayCache // with a policy only
	audit  Recorder              // nil: decisions are only logged
	log    *zap.Logger
	now    func() time.Time
	// sealer seals session tickets with the signer's current ticket key.
	sealer atomic.Pointer[ticketSealer]
}

// ticketSealer is the sealer of one ticket key.
type ticketSealer struct {
	key    *[32]byte
	sealer *callauth.TicketSealer
}

// Params are New's dependencies.
type Params struct {
	fx.In

	Config Config
	Signer *signer.Signer
	Logger *zap.Logger
	Audit  Recorder `optional:"true"`
}

// New loads the policy and builds the Authorizer.
func New(p Params) (*Authorizer, error) {
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	cfg := p.Config
	if cfg.MaxSkew == 0 {
		cfg.MaxSkew = DefaultMaxSkew
	}
	if cfg.SessionLifetime == 0 {
		cfg.SessionLifetime = callauth.DefaultSessionLifetime
	}
	log := p.Logger.Named("authz")
	a := &Authorizer{cfg: cfg, signer: p.Signer, audit: p.Audit, log: log, now: time.Now}
	if cfg.PolicyFile != "" {
		pol, err := Load(cfg.PolicyFile)
		if err != nil {
			return nil, err
		}
		a.policy = pol
		// Only a policy's callers get past the signature check into the
		// replay cache: without a policy there is none to allocate.
		if a.replay, err = callauth.NewReplayCache(cfg.MaxSkew, ReplayCapacity); err != nil {
			return nil, err
		}
		sum := pol.SHA256()
		log.Info("caller policy loaded", zap.String("file", cfg.PolicyFile), zap.String("sha256", fmt.Sprintf("%x", sum)), zap.Strings("callers", pol.Names()))
	}
	switch {
	case cfg.DevAllowAnonymous:
		log.Warn("DEVELOPMENT ONLY: --dev-allow-anonymous: calls without a caller signature may sign and administer keys. " +
			"Never use it outside development; a real enclave refuses it.")
	case a.policy == nil:
		log.Warn("no caller policy (--policy): no caller may sign or administer keys")
	}
	return a, nil
}

// PolicyFile is the policy in force, for attestation to commit to; nil
// when there is none.
func (a *Authorizer) PolicyFile() []byte {
	if a.policy == nil {
		return nil
	}
	return a.policy.Raw()
}

// Authorize implements server.Authorizer: it authenticates the caller of
// method from the call's metadata and the request's digest, checks the
// policy, and records the decision.
func (a *Authorizer) Authorize(ctx context.Context, method string, req any, digest [sha256.Size]byte) error {
	d := Decision{Time: a.now(), Method: method}
	if sr, ok := req.(*pb.SignRequest); ok {
		d.MessageSHA256 = sha256.Sum256(sr.GetMessage())
	}
	caller, err := a.authenticate(ctx, method, digest, &d)
	if err == nil {
		err = a.authorise(caller, method, req, &d)
	}
	if err != nil {
		st := status.Convert(err)
		d.Code, d.Reason = st.Code(), st.Message()
		return a.record(d, err)
	}
	d.Allowed, d.Code = true, codes.OK
	return a.record(d, nil)
}

// record keeps d; when it cannot, the call is refused.
func (a *Authorizer) record(d Decision, err error) error {
	if a.log.Core().Enabled(zap.DebugLevel) || !d.Allowed {
		a.log.Info("authorisation", zap.String("caller", d.Caller), zap.String("caller_id", d.CallerID), zap.String("method", d.Method),
			zap.String("key_id", d.KeyID), zap.String("algorithm", d.Algorithm), zap.Bool("allowed", d.Allowed),
			zap.String("code", d.Code.String()), zap.String("reason", d.Reason))
	}
	if a.audit == nil {
		return err
	}
	if rerr := a.audit.Record(d); rerr != nil {
		if err != nil {
			return err // denied either way
		}
		a.log.Error("call refused: the audit log cannot take its decision", zap.Error(rerr))
		return status.Error(codes.Unavailable, "the enclave's audit log is not being collected by the host (its backlog is full); no call is allowed until it is: retry later")
	}
	return err
}

// anonymous is the caller name of development calls without a signature.
const anonymous = "anonymous (development)"

func (a *Authorizer) authenticate(ctx context.Context, method string, digest [sha256.Size]byte, d *Decision) (*Caller, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	claims, err := callauth.ParseMetadata(md)
	if errors.Is(err, callauth.ErrMissing) {
		if a.cfg.DevAllowAnonymous {
			d.Caller = anonymous
			return nil, nil
		}
		return nil, status.Error(codes.Unauthenticated, "this call must be signed by a caller of the enclave's policy (nitrosign --identity FILE); it carries no caller signature")
	}
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	d.CallerID = claims.Caller()
	if a.policy == nil {
		return nil, status.Error(codes.Unauthenticated, "this enclave has no caller policy: no caller is known")
	}
	c, ok := a.policy.Caller(claims.Caller())
	if !ok {
		return nil, status.Errorf(codes.Unauthenticated, "unknown caller %s: not in the enclave's policy", claims.Caller())
	}
	d.Caller = c.Name
	if claims.IsSession() {
		if method == callauth.OpenSessionMethod {
			return nil, status.Errorf(codes.Unauthenticated, "caller %q: OpenSession must be signed with the caller's identity key, not made in a session", c.Name)
		}
		sealer, err := a.ticketSealer()
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "no session can be checked yet: %v", err)
		}
		switch err := claims.VerifySession(sealer, method, digest, d.Time); {
		case errors.Is(err, callauth.ErrSessionInvalid):
			return nil, callauth.SessionInvalidStatus(fmt.Sprintf("caller %q: %v: open a new session", c.Name, err)).Err()
		case err != nil:
			return nil, status.Errorf(codes.Unauthenticated, "caller %q: %v", c.Name, err)
		}
	} else if err := claims.VerifyDigest(c.Public, method, digest); err != nil {
		return nil, status.Errorf(codes.Unauthenticated, "caller %q: %v", c.Name, err)
	}
	// Only a verified call is remembered: forged ones cannot fill the cache.
	switch err := a.replay.Check(claims, d.Time); {
	case errors.Is(err, callauth.ErrCacheFull):
		return nil, status.Errorf(codes.ResourceExhausted, "caller %q: %v", c.Name, err)
	case err != nil:
		return nil, status.Errorf(codes.Unauthenticated, "caller %q: %v", c.Name, err)
	}
	return c, nil
}

func (a *Authorizer) authorise(c *Caller, method string, req any, d *Decision) error {
	if method == callauth.OpenSessionMethod {
		// Any caller of the policy: a session lets it make only the calls
		// the policy allows it.
		if c == nil {
			return status.Error(codes.Unauthenticated, "a session is opened by a caller of the enclave's policy: OpenSession must be signed (nitrosign --identity FILE)")
		}
		return nil
	}
	if strings.HasPrefix(method, callauth.KeyAdminPrefix) {
		if c == nil || c.Admin { // c nil: anonymous, allowed in development
			return nil
		}
		return status.Errorf(codes.PermissionDenied, `caller %q may not administer keys (its policy entry has no "admin": true)`, c.Name)
	}
	sr, ok := req.(*pb.SignRequest)
	if !ok {
		return status.Errorf(codes.PermissionDenied, "method %s is not open to callers", method)
	}
	k, err := a.signer.Key(sr.GetKey())
	if err != nil {
		// A malformed selector, an unknown key, keys not ready: Sign
		// answers it precisely; nothing is signed.
		if c == nil {
			return nil
		}
		return status.Errorf(codes.PermissionDenied, "caller %q: no key it may use is selected (%v)", c.Name, err)
	}
	alg := sr.GetSigningAlgorithm()
	if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED {
		alg = k.GetDefaultSigningAlgorithm()
	}
	d.KeyID, d.Algorithm = k.GetKeyId(), sigalg.Name(alg)
	if c == nil || c.MaySign(k.GetKeyId(), k.GetKeyType(), alg) {
		return nil
	}
	return status.Errorf(codes.PermissionDenied, "caller %q may not sign with key %s (%s) using %s",
		c.Name, k.GetKeyId(), sigalg.TypeName(k.GetKeyType()), sigalg.Name(alg))
}

// ticketSealer returns the sealer of the signer's ticket key, made again
// when the keys change.
func (a *Authorizer) ticketSealer() (*callauth.TicketSealer, error) {
	key, err := a.signer.SessionTicketKey()
	if err != nil {
		return nil, err
	}
	if cur := a.sealer.Load(); cur != nil && cur.key == key {
		return cur.sealer, nil
	}
	sealer, err := callauth.NewTicketSealer(key[:])
	if err != nil {
		return nil, err
	}
	a.sealer.Store(&ticketSealer{key: key, sealer: sealer})
	return sealer, nil
}

// OpenSession answers SessionService.OpenSession, whose signature Authorize
// verified: a ticket for the caller the call names.
func (a *Authorizer) OpenSession(ctx context.Context, req *pb.OpenSessionRequest) (*pb.OpenSessionResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	claims, err := callauth.ParseMetadata(md)
	if err != nil || claims.IsSession() {
		// Authorize refused such a call already.
		return nil, status.Error(codes.Unauthenticated, "OpenSession must be signed with the caller's identity key")
	}
	sealer, err := a.ticketSealer()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "no session can be opened yet: %v", err)
	}
	share, ticket, expiry, err := callauth.AcceptSession(sealer, claims.Caller(), req.GetClientShare(), a.now(), a.cfg.SessionLifetime)
	if errors.Is(err, callauth.ErrInvalidInput) {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err != nil {
		a.log.Error("open a session", zap.Error(err))
		return nil, status.Error(codes.Internal, "internal error")
	}
	return &pb.OpenSessionResponse{EnclaveShare: share, Ticket: ticket, ExpireTime: timestamppb.New(expiry)}, nil
}
