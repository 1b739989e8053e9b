package attest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"
	"go.uber.org/fx"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/internal/keycommit"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Cache renewal bounds: the cached document is renewed once its leaf has
// less than cacheRenewBefore left, but at most once per cacheMinAge, so an
// NSM whose leaf is itself near expiry is not asked on every call.
const (
	cacheRenewBefore = 30 * time.Minute
	cacheMinAge      = time.Minute
)

// KeySource lists the enclave's signing keys; the signer implements it.
type KeySource interface {
	Keys() []*pb.KeyInfo
}

// PolicySource gives the caller policy the enclave enforces (the policy
// file's bytes), which documents then commit to (key commitment version
// 2); nil or empty: none.
type PolicySource interface {
	PolicyFile() []byte
}

// Params are the Attester's dependencies.
type Params struct {
	fx.In

	Config Config
	Logger *zap.Logger
	NSM    NSM
	Keys   KeySource
	// Policy, when present and not empty, is committed to as well.
	Policy PolicySource `optional:"true"`
	// Lifecycle, when present, warms the start-up document on start.
	Lifecycle fx.Lifecycle `optional:"true"`
}

// Result is one attestation.
type Result struct {
	// Document is the COSE_Sign1 document exactly as the NSM returned it.
	Document []byte
	// Keys are the keys its user_data commits to, sorted by key_id.
	Keys []*pb.KeyInfo
	// Policy is the policy file it commits to (version 2); nil: none.
	Policy []byte
	// Simulated is true when the document comes from the simulated NSM;
	// RootDER is then the development root it chains to.
	Simulated bool
	RootDER   []byte
}

// Attester makes attestation documents that commit to the signing keys. It
// is safe for concurrent use.
type Attester struct {
	log     *zap.Logger
	nsm     NSM
	keys    KeySource
	policy  []byte // committed to when not nil
	maxAge  time.Duration
	now     func() time.Time
	rootDER []byte // nil unless simulated

	calls atomic.Uint64

	// startup is a one-slot semaphore guarding cached: holding it across
	// the NSM call makes concurrent first callers share one document, and,
	// unlike a mutex, a waiter can give up when its context ends.
	startup chan struct{}
	cached  *cachedDoc
}

type cachedDoc struct {
	commitment []byte
	document   []byte
	fetched    time.Time
	leafExpiry time.Time // zero when the document could not be parsed
}

// New builds an Attester. With a Lifecycle it makes the start-up document
// in OnStart (one NSM call; a failure is logged and retried on first use).
func New(p Params) (*Attester, error) {
	if p.NSM == nil {
		return nil, errors.New("attest: New: nil NSM")
	}
	if p.Keys == nil {
		return nil, errors.New("attest: New: nil KeySource")
	}
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	log := p.Logger
	if log == nil {
		log = zap.NewNop()
	}
	a := &Attester{
		log:     log.Named("attest"),
		nsm:     p.NSM,
		keys:    p.Keys,
		maxAge:  p.Config.withDefaults().CacheMaxAge,
		now:     time.Now,
		startup: make(chan struct{}, 1),
	}
	if sim, ok := p.NSM.(Simulation); ok {
		a.rootDER = sim.DevRootDER()
	}
	if p.Policy != nil {
		if f := p.Policy.PolicyFile(); len(f) > 0 {
			a.policy = bytes.Clone(f)
		}
	}
	if p.Lifecycle != nil {
		p.Lifecycle.Append(fx.StartHook(func(ctx context.Context) {
			_, err := a.Attest(ctx, nil, nil)
			switch {
			case errors.Is(err, keycommit.ErrNoKeys):
				// Sealed keys are installed after start: the document is
				// made on the first request after that.
				a.log.Info("no signing keys yet (a sealed keyset is being loaded); the start-up attestation document is made on first request")
			case err != nil:
				a.log.Warn("start-up attestation document not ready; will retry on first request", zap.Error(err))
			}
		}))
	}
	return a, nil
}

// NSMCalls returns how many attestation requests this Attester has sent to
// the NSM, successful or not.
func (a *Attester) NSMCalls() uint64 { return a.calls.Load() }

// Attest returns a document whose user_data is the commitment to the current
// keys and userData. With neither nonce nor userData it returns the cached
// start-up document (no NSM call while it is fresh); otherwise it asks the
// NSM for a new document carrying nonce. Each argument is at most
// MaxFieldSize bytes (else ErrInvalidArgument).
func (a *Attester) Attest(ctx context.Context, nonce, userData []byte) (*Result, error) {
	if err := checkSizes(nonce, userData, nil); err != nil {
		return nil, err
	}
	keys, err := keycommit.SortKeys(a.keys.Keys())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrKeys, err)
	}
	var commitment []byte
	if a.policy != nil {
		sum := sha256.Sum256(a.policy)
		commitment, err = keycommit.ComputeWithPolicy(keys, sum[:], userData)
	} else {
		commitment, err = keycommit.Compute(keys, userData)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrKeys, err)
	}
	var doc []byte
	if len(nonce) == 0 && len(userData) == 0 {
		doc, err = a.startupDocument(ctx, commitment)
	} else {
		doc, err = a.request(ctx, nonce, commitment)
	}
	if err != nil {
		return nil, err
	}
	res := &Result{
		Document:  doc,
		Keys:      make([]*pb.KeyInfo, len(keys)),
		Simulated: a.rootDER != nil,
		RootDER:   bytes.Clone(a.rootDER),
		Policy:    bytes.Clone(a.policy),
	}
	for i, k := range keys {
		res.Keys[i] = proto.CloneOf(k)
	}
	return res, nil
}

// startupDocument returns the cached document for commitment, renewing it
// when the keys changed, it is older than maxAge, or its leaf nears expiry.
func (a *Attester) startupDocument(ctx context.Context, commitment []byte) ([]byte, error) {
	select {
	case a.startup <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-a.startup }()

	now := a.now()
	if c := a.cached; c != nil && bytes.Equal(c.commitment, commitment) && a.fresh(c, now) {
		return bytes.Clone(c.document), nil
	}
	doc, err := a.request(ctx, nil, commitment)
	if err != nil {
		return nil, fmt.Errorf("start-up document: %w", err)
	}
	c := &cachedDoc{commitment: commitment, document: doc, fetched: now}
	if c.leafExpiry, err = leafNotAfter(doc); err != nil {
		a.log.Warn("cannot read the leaf certificate of the NSM's document; renewing by age only", zap.Error(err))
	}
	a.cached = c
	a.log.Info("start-up attestation document cached",
		zap.Int("bytes", len(doc)), zap.Time("leaf_not_after", c.leafExpiry))
	return bytes.Clone(doc), nil
}

func (a *Attester) fresh(c *cachedDoc, now time.Time) bool {
	age := now.Sub(c.fetched)
	if age < cacheMinAge {
		return true
	}
	if age >= a.maxAge {
		return false
	}
	return c.leafExpiry.IsZero() || now.Add(cacheRenewBefore).Before(c.leafExpiry)
}

// request sends one attestation request. The ioctl cannot be interrupted,
// so ctx is only checked before it.
func (a *Attester) request(ctx context.Context, nonce, userData []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	a.calls.Add(1)
	doc, err := a.nsm.Attestation(nonce, userData, nil)
	if err != nil {
		return nil, err
	}
	a.log.Debug("NSM attestation", zap.Int("nonce_bytes", len(nonce)), zap.Int("bytes", len(doc)))
	return doc, nil
}

// leafNotAfter reads the expiry of the document's leaf certificate, without
// verifying anything: the document comes straight from our own NSM.
func leafNotAfter(doc []byte) (time.Time, error) {
	var msg cose.UntaggedSign1Message
	if err := msg.UnmarshalCBOR(doc); err != nil {
		return time.Time{}, err
	}
	var p struct {
		Certificate []byte `cbor:"certificate"`
	}
	if err := cbor.Unmarshal(msg.Payload, &p); err != nil {
		return time.Time{}, err
	}
	cert, err := x509.ParseCertificate(p.Certificate)
	if err != nil {
		return time.Time{}, err
	}
	return cert.NotAfter, nil
}
