/** Every id the extension declares in package.json, in one place. */
export const EXTENSION_ID = 'till.till';

export const VIEW_CONTAINER = 'till';
export const KEYS_VIEW = 'till.keys';
export const USAGE_VIEW = 'till.usage';
export const AGENT_TERMINAL_PROFILE = 'till.agentTerminal';

export const COMMANDS = {
  addCredential: 'till.addCredential',
  removeCredential: 'till.removeCredential',
  moveCredential: 'till.moveCredential',
  issueKey: 'till.issueKey',
  revokeKey: 'till.revokeKey',
  revokeAll: 'till.revokeAll',
  copyKeyId: 'till.copyKeyId',
  copyBaseUrl: 'till.copyBaseUrl',
  openAgentTerminal: 'till.openAgentTerminal',
  showAuditLog: 'till.showAuditLog',
  restartBroker: 'till.restartBroker',
  showBrokerLog: 'till.showBrokerLog',
  refresh: 'till.refresh',
  focusSidebar: 'till.focusSidebar',
  openDashboard: 'till.openDashboard',
} as const;

export const CONTEXT = {
  /** `till.hasCredential`: drives the welcome view. */
  hasCredential: 'till.hasCredential',
  hasKey: 'till.hasKey',
} as const;

export const SETTINGS = {
  section: 'till',
  terminalInject: 'terminal.inject',
  terminalProviders: 'terminal.providers',
  terminalPolicy: 'terminal.policy',
  terminalAgents: 'terminal.agents',
  issuePolicy: 'issue.defaultPolicy',
  brokerPort: 'broker.port',
  upstreams: 'upstreams',
  prices: 'prices',
  notifications: 'notifications.enabled',
  confirmRevokeInUse: 'revoke.confirmInUse',
  credentialStore: 'credentials.store',
} as const;

/**
 * Agents new terminals are set up for by default: those set up by env vars alone. Codex is left
 * out because its setup moves CODEX_HOME (sessions, login) to a folder of Till's.
 */
export const TERMINAL_AGENTS_DEFAULT = ['claude', 'gemini', 'aider'];
