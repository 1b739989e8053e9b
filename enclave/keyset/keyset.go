// Package keyset keeps the enclave's keys across restarts (--key-mode
// sealed): a keyset sealed with AWS KMS, stored by the parent, unsealed
// only by an attested enclave.
//
// At start the Manager asks the host (HostService over vsock) for the
// sealed keyset, gets its data key from KMS (Decrypt with a Recipient:
// only an enclave whose attestation document satisfies the key policy
// gets it), opens it (package sealing), and installs its keys in the
// signer; then health turns SERVING. A keyset that exists but cannot be
// unsealed is never replaced: the enclave stays NOT_SERVING, says why on
// health and in its logs, and tries again with backoff (a KMS outage, a
// policy being fixed, a file being restored). A new keyset is made only
// when the host says the operator asked for one (nitrosign keyset init).
//
// Rotation (KeyAdminService) seals the changed keyset under a new data key
// and has the host store it (compare-and-swap: a change made meanwhile by
// another enclave is not lost) before the signer uses it. Every enclave
// re-reads the host's keyset periodically and takes a newer one, so
// several enclaves converge on one keyset.
package keyset

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/enclave/sealing"
	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Defaults of Config.
const (
	DefaultHostAddr        = "vsock://3:5051"
	DefaultKMSProxy        = "vsock://3:8000"
	DefaultRefreshInterval = 30 * time.Second
	DefaultRetryMin        = time.Second
	DefaultRetryMax        = 30 * time.Second
	DefaultAttemptTimeout  = time.Minute
)

// Config is where the keyset and KMS are. In an enclave every field comes
// from Dockerfile.enclave's ENTRYPOINT, and so is measured into the PCRs:
// the parent cannot point the enclave at another KMS key.
type Config struct {
	// KMSKeyARN is the KMS key the keyset is sealed under: a key ARN (its
	// region is the KMS endpoint's). Required.
	KMSKeyARN string
	// HostAddr is the host's HostService. Default vsock://3:5051.
	HostAddr string
	// KMSProxy is where the KMS client's connections go: the parent's
	// forwarder to the regional endpoint (nitrosign-proxy
	// --kms-forward-port, or AWS's vsock-proxy). Default vsock://3:8000.
	KMSProxy string
	// KMSCAFile replaces the compiled-in Amazon roots (tests: a test KMS's
	// CA). Empty: the Amazon roots.
	KMSCAFile string
	// KMSEndpoint overrides the SDK's endpoint URL (a FIPS endpoint, a
	// test KMS). Empty: https://kms.REGION.amazonaws.com.
	KMSEndpoint string
	// RefreshInterval is how often the host's keyset is read again to take
	// a rotation made by another enclave. Default 30s.
	RefreshInterval time.Duration
	// RetryMin and RetryMax bound the backoff between attempts to unseal
	// at start. Defaults 1s and 30s.
	RetryMin, RetryMax time.Duration
	// AttemptTimeout bounds one attempt to load (or re-read) the keyset:
	// the host's answer and KMS's, retries of the SDK included. A slow KMS
	// is then an attempt that failed. Default 1m.
	AttemptTimeout time.Duration
}

// DefaultConfig returns the defaults; KMSKeyARN is left to the operator.
func DefaultConfig() Config {
	return Config{HostAddr: DefaultHostAddr, KMSProxy: DefaultKMSProxy, RefreshInterval: DefaultRefreshInterval,
		RetryMin: DefaultRetryMin, RetryMax: DefaultRetryMax, AttemptTimeout: DefaultAttemptTimeout}
}

// Validate reports every invalid field.
func (c Config) Validate() error {
	var errs []error
	if _, err := RegionOf(c.KMSKeyARN); err != nil {
		errs = append(errs, fmt.Errorf("--kms-key-arn: %w", err))
	}
	if c.HostAddr == "" || c.KMSProxy == "" {
		errs = append(errs, errors.New("--keyset-host and --kms-proxy are required with --key-mode sealed"))
	}
	if c.RefreshInterval <= 0 || c.RetryMin <= 0 || c.RetryMax < c.RetryMin || c.AttemptTimeout <= 0 {
		errs = append(errs, fmt.Errorf("keyset timing: refresh %s, retry %s..%s, attempt timeout %s: want > 0 and min <= max",
			c.RefreshInterval, c.RetryMin, c.RetryMax, c.AttemptTimeout))
	}
	return errors.Join(errs...)
}

// KeysChanged is told when the signer's keys changed (*server.Server).
type KeysChanged interface{ KeysChanged() }

// Params are New's dependencies.
type Params struct {
	fx.In

	Config       Config
	SignerConfig signer.Config
	Logger       *zap.Logger
	Signer       *signer.Signer
	NSM          sealing.Attester
	Lifecycle    fx.Lifecycle `optional:"true"`
}

// Manager loads, seals and rotates the keyset.
type Manager struct {
	cfg    Config
	sigCfg signer.Config
	log    *zap.Logger
	signer *signer.Signer
	host   pb.HostServiceClient
	conn   *grpc.ClientConn
	keys   *sealing.DataKeys
	now    func() time.Time

	notify KeysChanged // set before Start

	// mu serialises loading and every change; it is held across KMS and
	// host calls, which are bounded.
	mu      sync.Mutex
	current *sealing.Keyset // nil until loaded
	sealed  []byte          // current, as the host holds it
	header  *keysetfmt.Header

	ctx     context.Context
	cancel  context.CancelFunc
	started bool // Start and Stop are called by one goroutine (fx)
	done    chan struct{}
}

// Module provides *Manager, as the server's KeyAdmin, and tells the
// server when the keys change.
var Module = fx.Module("keyset",
	fx.Provide(New, func(m *Manager) server.KeyAdmin { return m }),
	fx.Invoke(func(m *Manager, s *server.Server) { m.notify = s }),
)

// New dials the host (lazily) and builds the KMS client; nothing is
// fetched before Start.
func New(p Params) (*Manager, error) {
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	conn, err := dialHost(p.Config.HostAddr)
	if err != nil {
		return nil, err
	}
	host := pb.NewHostServiceClient(conn)
	client, err := newKMSClient(p.Config, hostCredentials(host))
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	keys, err := sealing.NewDataKeys(client, p.NSM, p.Config.KMSKeyARN)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		cfg: p.Config, sigCfg: p.SignerConfig, log: p.Logger.Named("keyset"), signer: p.Signer,
		host: host, conn: conn, keys: keys, now: time.Now,
		ctx: ctx, cancel: cancel, done: make(chan struct{}),
	}
	if p.Lifecycle != nil {
		p.Lifecycle.Append(fx.Hook{
			OnStart: func(context.Context) error { m.Start(); return nil },
			OnStop:  func(context.Context) error { m.Stop(); return nil },
		})
	}
	return m, nil
}

// Start loads the keyset in the background, then keeps it fresh.
func (m *Manager) Start() {
	m.log.Info("loading the sealed keyset", zap.String("kms_key_arn", m.cfg.KMSKeyARN),
		zap.String("host", m.cfg.HostAddr), zap.String("kms_proxy", m.cfg.KMSProxy))
	if m.cfg.KMSCAFile != "" {
		m.log.Warn("KMS TLS trusts only --kms-ca-file, not the Amazon roots: for tests against a KMS of your own", zap.String("file", m.cfg.KMSCAFile))
	}
	m.started = true
	go m.run()
}

// Stop ends loading and refreshing and closes the host connection.
func (m *Manager) Stop() {
	m.cancel()
	if m.started {
		<-m.done
	}
	_ = m.conn.Close()
}

func (m *Manager) run() {
	defer close(m.done)
	delay := m.cfg.RetryMin
	for {
		ctx, cancel := context.WithTimeout(m.ctx, m.cfg.AttemptTimeout)
		err := m.load(ctx)
		cancel()
		if err == nil {
			break
		}
		if m.ctx.Err() != nil {
			return
		}
		// Jitter, so enclaves started together do not call KMS in step.
		wait := delay/2 + rand.N(delay/2+1)
		reason := fmt.Sprintf("%v (next attempt in %s)", err, wait.Round(100*time.Millisecond))
		m.signer.SetNotReady(reason)
		m.changed()
		m.log.Error("sealed keyset not loaded; not serving", zap.String("reason", err.Error()), zap.Duration("retry_in", wait))
		if !m.sleep(wait) {
			return
		}
		delay = min(2*delay, m.cfg.RetryMax)
	}
	t := time.NewTicker(m.cfg.RefreshInterval)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(m.ctx, m.cfg.AttemptTimeout)
			err := m.refresh(ctx)
			cancel()
			if err != nil && m.ctx.Err() == nil {
				m.log.Warn("could not re-read the host's keyset; serving the keys in use", zap.Error(err))
			}
		}
	}
}

func (m *Manager) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-m.ctx.Done():
		return false
	}
}

func (m *Manager) changed() {
	if m.notify != nil {
		m.notify.KeysChanged()
	}
}

// load fetches the host's keyset and opens it, or creates one when the
// operator asked for it, and installs the keys.
func (m *Manager) load(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	got, err := m.fetch(ctx)
	if err != nil {
		return err
	}
	if len(got.GetSealed()) == 0 {
		if !got.GetInitRequested() {
			return fmt.Errorf("the host holds no sealed keyset (%s); a new keyset is made only when the operator asks: run `nitrosign keyset init` on the parent", got.GetLocation())
		}
		return m.create(ctx, got.GetLocation())
	}
	ks, err := m.open(ctx, got.GetSealed())
	if err != nil {
		return err
	}
	if err := m.install(ks, got.GetSealed()); err != nil {
		return err
	}
	m.log.Info("sealed keyset unsealed", zap.Strings("key_ids", m.header.KeyIDs), zap.Time("sealed", m.header.Sealed), zap.String("location", got.GetLocation()))
	return nil
}

func (m *Manager) fetch(ctx context.Context) (*pb.GetSealedKeysetResponse, error) {
	cctx, cancel := context.WithTimeout(ctx, hostCallTimeout)
	defer cancel()
	got, err := m.host.GetSealedKeyset(cctx, &pb.GetSealedKeysetRequest{})
	if err != nil {
		return nil, fmt.Errorf("the host (%s) did not hand over the sealed keyset: %s", m.cfg.HostAddr, statusText(err))
	}
	return got, nil
}

// open unseals sealed: KMS must release its data key to this enclave.
func (m *Manager) open(ctx context.Context, sealed []byte) (*sealing.Keyset, error) {
	ks, err := sealing.Unseal(ctx, sealed, m.keys)
	if err != nil {
		return nil, fmt.Errorf("the sealed keyset cannot be unsealed: %w", err)
	}
	return ks, nil
}

// create makes, seals and stores a new keyset: the key types and sizes
// configured, version 1 each.
func (m *Manager) create(ctx context.Context, location string) error {
	m.log.Warn("the operator asked for a new keyset (nitrosign keyset init): creating one", zap.String("location", location))
	now := m.now().UTC()
	ks := &sealing.Keyset{Created: now}
	for _, typ := range signer.Types(m.sigCfg) {
		k, err := m.newKey(typ, 1, now)
		if err != nil {
			return err
		}
		ks.Keys = append(ks.Keys, k)
	}
	if err := m.commit(ctx, ks); err != nil {
		return err
	}
	m.log.Info("new keyset created, sealed and stored", zap.Strings("key_ids", m.header.KeyIDs))
	return nil
}

func (m *Manager) newKey(typ pb.KeyType, version int, now time.Time) (sealing.Key, error) {
	priv, err := signer.Generate(m.sigCfg, typ)
	if err != nil {
		return sealing.Key{}, err
	}
	id, err := keyIDOf(priv)
	if err != nil {
		return sealing.Key{}, err
	}
	return sealing.Key{ID: id, Type: typ, Version: version, State: sealing.Enabled, Created: now, Private: priv}, nil
}

// commit self-tests ks, seals it, has the host store it in place of the
// current one, and installs it. Nothing changes unless all of it works.
func (m *Manager) commit(ctx context.Context, ks *sealing.Keyset) error {
	var probe signer.Signer
	if err := probe.Install(toSigner(ks)); err != nil {
		return err
	}
	sealed, err := sealing.Seal(ctx, ks, m.keys, m.now())
	if err != nil {
		return fmt.Errorf("%w: sealing the keyset: %w", server.ErrAdminUnavailable, err)
	}
	var replaces []byte
	if m.sealed != nil {
		sum := sha256.Sum256(m.sealed)
		replaces = sum[:]
	}
	cctx, cancel := context.WithTimeout(ctx, hostCallTimeout)
	defer cancel()
	put, err := m.host.PutSealedKeyset(cctx, &pb.PutSealedKeysetRequest{Sealed: sealed, ReplacesSha256: replaces})
	if status.Code(err) == codes.Aborted {
		return fmt.Errorf("%w: the host's keyset changed meanwhile (another enclave changed it); this enclave takes it within %s, then retry", server.ErrAborted, m.cfg.RefreshInterval)
	}
	if err != nil {
		return fmt.Errorf("%w: the host did not store the sealed keyset: %s", server.ErrAdminUnavailable, statusText(err))
	}
	if err := m.install(ks, sealed); err != nil {
		// Stored but not installable: cannot happen after the probe; say
		// so loudly rather than serve what is not stored.
		m.log.Error("stored keyset not installed", zap.Error(err))
		return err
	}
	m.log.Info("sealed keyset stored by the host", zap.String("location", put.GetLocation()), zap.String("previous", put.GetPreviousLocation()))
	return nil
}

// install makes ks the signer's keys and the current keyset.
func (m *Manager) install(ks *sealing.Keyset, sealed []byte) error {
	h, err := keysetfmt.ReadHeader(sealed)
	if err != nil {
		return err
	}
	if err := m.signer.Install(toSigner(ks)); err != nil {
		return fmt.Errorf("the keyset's keys: %w", err)
	}
	m.current, m.sealed, m.header = ks, bytes.Clone(sealed), h
	m.changed()
	return nil
}

// refresh takes a newer keyset from the host (a rotation by another
// enclave). An older one is refused: a running enclave never rolls back.
func (m *Manager) refresh(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	got, err := m.fetch(ctx)
	if err != nil {
		return err
	}
	if len(got.GetSealed()) == 0 || bytes.Equal(got.GetSealed(), m.sealed) {
		return nil
	}
	h, err := keysetfmt.ReadHeader(got.GetSealed())
	if err != nil {
		return fmt.Errorf("the host's keyset changed to one that does not parse: %w", err)
	}
	if !h.Sealed.After(m.header.Sealed) {
		return fmt.Errorf("the host's keyset changed to one sealed at %s, not after the one in use (%s): refused (a rollback?)", h.Sealed, m.header.Sealed)
	}
	ks, err := m.open(ctx, got.GetSealed())
	if err != nil {
		return err
	}
	if err := m.install(ks, got.GetSealed()); err != nil {
		return err
	}
	m.log.Info("took the host's newer keyset (changed by another enclave)", zap.Strings("key_ids", h.KeyIDs), zap.Time("sealed", h.Sealed))
	return nil
}

// CreateKey adds a new version of typ, the type's default from now on.
func (m *Manager) CreateKey(ctx context.Context, typ pb.KeyType) (*pb.KeyInfo, error) {
	if !slices.Contains([]pb.KeyType{pb.KeyType_KEY_TYPE_RSA, pb.KeyType_KEY_TYPE_ECC, pb.KeyType_KEY_TYPE_ED25519}, typ) {
		return nil, fmt.Errorf("%w: key_type must be KEY_TYPE_RSA, KEY_TYPE_ECC or KEY_TYPE_ED25519, got %d", signer.ErrInvalidArgument, int32(typ))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.ready(); err != nil {
		return nil, err
	}
	version := 0
	for _, k := range m.current.Keys {
		if k.Type == typ {
			version = max(version, k.Version)
		}
	}
	k, err := m.newKey(typ, version+1, m.now().UTC())
	if err != nil {
		return nil, err
	}
	next := &sealing.Keyset{Created: m.current.Created, Keys: append(slices.Clone(m.current.Keys), k)}
	if err := m.commit(ctx, next); err != nil {
		return nil, err
	}
	m.log.Info("key created", zap.String("key_id", k.ID), zap.String("key_type", sigalg.TypeName(typ)), zap.Int("version", k.Version))
	return m.signer.Key(&pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: k.ID}})
}

// SetKeyEnabled enables or disables the key keyID.
func (m *Manager) SetKeyEnabled(ctx context.Context, keyID string, enabled bool) (*pb.KeyInfo, error) {
	sel := &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: keyID}}
	if _, err := m.signer.Key(sel); err != nil {
		return nil, err // malformed, unknown or not ready
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.ready(); err != nil {
		return nil, err
	}
	state := sealing.Disabled
	if enabled {
		state = sealing.Enabled
	}
	next := &sealing.Keyset{Created: m.current.Created, Keys: slices.Clone(m.current.Keys)}
	i := slices.IndexFunc(next.Keys, func(k sealing.Key) bool { return k.ID == keyID })
	if i < 0 {
		return nil, fmt.Errorf("%w: no key with id %s", signer.ErrNotFound, keyID)
	}
	if next.Keys[i].State != state {
		next.Keys[i].State = state
		if err := m.commit(ctx, next); err != nil {
			return nil, err
		}
		m.log.Info("key state changed", zap.String("key_id", keyID), zap.String("state", string(state)))
	}
	return m.signer.Key(sel)
}

func (m *Manager) ready() error {
	if m.current == nil {
		return fmt.Errorf("%w: %s", signer.ErrNotReady, m.signer.NotReady())
	}
	return nil
}

// keyIDOf is the id of priv's public key.
func keyIDOf(priv crypto.Signer) (string, error) {
	spki, err := x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		return "", err
	}
	return signer.KeyID(spki), nil
}

func toSigner(ks *sealing.Keyset) []signer.Key {
	out := make([]signer.Key, len(ks.Keys))
	for i, k := range ks.Keys {
		out[i] = signer.Key{Type: k.Type, Version: k.Version, Disabled: k.State == sealing.Disabled, Created: k.Created, Private: k.Private}
	}
	return out
}

// statusText is a gRPC error's code and message.
func statusText(err error) string {
	st := status.Convert(err)
	return st.Code().String() + ": " + st.Message()
}
