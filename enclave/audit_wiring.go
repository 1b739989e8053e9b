package enclave

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/audit"
	"github.com/nitrosign/nitrosign/enclave/authz"
	"github.com/nitrosign/nitrosign/internal/target"
)

// auditConnectWait bounds the wait at start for the host's audit receiver
// to say which head it stored last; without an answer the chain starts
// naming none, and its entries wait in the backlog until the host answers.
const auditConnectWait = 10 * time.Second

// auditFlushTimeout bounds the wait at stop for the host to take the last
// entries.
const auditFlushTimeout = 5 * time.Second

// errAuditOff refuses an enclave that keeps no audit trail outside
// development.
var errAuditOff = errors.New("--audit-ship \"\" (no audit trail) is for development only and needs --dev-simulated-nsm: " +
	"a real enclave records every signing decision")

// auditModule records every authorisation decision in the audit trail
// (package audit) and ships it to the host (--audit-ship): authz's
// Recorder. Sign is refused when a decision cannot be recorded. Without a
// target (development only) decisions are logged, not audited.
func auditModule(c Config) fx.Option {
	if c.AuditShip == "" {
		return fx.Options()
	}
	return fx.Options(
		fx.Provide(func(lc fx.Lifecycle, n attest.NSM, log *zap.Logger) (authz.Recorder, error) {
			t, err := target.Parse(c.AuditShip)
			if err != nil {
				return nil, fmt.Errorf("audit target: %w", err)
			}
			sh, err := audit.NewShipper(audit.ShipConfig{Dial: t.Dial}, log)
			if err != nil {
				return nil, err
			}
			r := &auditRecorder{}
			lc.Append(fx.Hook{
				OnStart: func(ctx context.Context) error {
					cctx, cancel := context.WithTimeout(ctx, auditConnectWait)
					previous, err := sh.Connect(cctx)
					cancel()
					if err != nil {
						log.Warn("the host's audit receiver did not answer: the audit chain starts naming no previous head; "+
							"its entries wait in the enclave until the host takes them (signing stops when the backlog is full)",
							zap.String("target", c.AuditShip), zap.Error(err))
						previous = nil
					}
					l, err := audit.New(audit.Config{}, func(spki []byte) ([]byte, error) { return n.Attestation(nil, nil, spki) }, previous, nil)
					if err != nil {
						return err
					}
					if err := sh.Ship(l); err != nil {
						_ = l.Close()
						return err
					}
					r.log.Store(l)
					log.Info("audit trail started", zap.String("chain", l.Chain()), zap.String("target", c.AuditShip))
					return nil
				},
				OnStop: func(ctx context.Context) error {
					if l := r.log.Load(); l != nil {
						_ = l.Close()
					}
					fctx, cancel := context.WithTimeout(ctx, auditFlushTimeout)
					defer cancel()
					if err := sh.Close(fctx); err != nil {
						log.Error("audit entries not taken by the host at stop", zap.Error(err))
					}
					return nil
				},
			})
			return r, nil
		}),
	)
}

// auditRecorder is authz's Recorder over the audit log started at OnStart.
type auditRecorder struct {
	log atomic.Pointer[audit.Log]
}

var errAuditNotStarted = errors.New("audit: the audit trail has not started")

func (r *auditRecorder) Record(d authz.Decision) error {
	l := r.log.Load()
	if l == nil {
		return errAuditNotStarted
	}
	outcome := audit.Denied
	if d.Allowed {
		outcome = audit.Allowed
	}
	return l.Append(audit.Decision{
		Caller: d.Caller, CallerID: d.CallerID, Method: d.Method, KeyID: d.KeyID, Algorithm: d.Algorithm,
		MessageSHA256: d.MessageSHA256, Outcome: outcome, Code: d.Code, Reason: d.Reason,
	})
}
