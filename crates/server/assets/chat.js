// Switchboard chat page: signs in, connects to the /hubs/chat hub with the
// official SignalR browser client, and sends messages to users by name.
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const el = {
    missing: $('missing-client'),
    signinForm: $('signin-form'),
    user: $('user'),
    tokenField: $('token-field'),
    token: $('token'),
    signin: $('signin'),
    status: $('status'),
    whoami: $('whoami'),
    connectionId: $('connection-id'),
    sendForm: $('send-form'),
    to: $('to'),
    message: $('message'),
    send: $('send'),
    messages: $('messages'),
    errors: $('errors'),
  };

  let connection = null;
  let token = null;

  function addItem(list, text) {
    const li = document.createElement('li');
    li.textContent = text;
    list.appendChild(li);
    li.scrollIntoView({ block: 'nearest' });
  }

  function showError(text) {
    addItem(el.errors, text);
  }

  function errorText(err) {
    return err && err.message ? err.message : String(err);
  }

  function setStatus(text, connectionId) {
    el.status.textContent = text;
    el.status.dataset.state = text.toLowerCase().replace(/[^a-z]/g, '');
    if (connectionId !== undefined) {
      el.connectionId.textContent = connectionId || '—';
    }
    el.send.disabled = !(connection && connection.state === signalR.HubConnectionState.Connected);
  }

  // Reads the user claim of a JWT for display only; the server decides who we are.
  function tokenSubject(jwt) {
    try {
      const part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      const claims = JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)));
      return typeof claims.sub === 'string' ? claims.sub : null;
    } catch (_) {
      return null;
    }
  }

  if (typeof window.signalR === 'undefined') {
    el.missing.textContent = '';
    el.missing.append(
      'The SignalR browser client is missing: run ',
      Object.assign(document.createElement('code'), { textContent: 'npm ci --prefix web' }),
      ' and restart the server.'
    );
    el.missing.hidden = false;
    el.signin.disabled = true;
    el.send.disabled = true;
    el.status.textContent = 'Unavailable';
    return;
  }

  async function fetchDevToken(user) {
    const response = await fetch('/auth/dev-token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user }),
    });
    if (response.status === 404) {
      return null;
    }
    if (!response.ok) {
      const body = await response.text();
      throw new Error(`Sign-in failed (HTTP ${response.status})${body ? ': ' + body : ''}`);
    }
    const json = await response.json();
    if (!json || typeof json.token !== 'string') {
      throw new Error('Sign-in failed: the server sent no token.');
    }
    return json.token;
  }

  function showTokenField() {
    el.tokenField.hidden = false;
    el.token.focus();
  }

  async function connect(accessToken, displayName) {
    if (connection) {
      const old = connection;
      connection = null;
      await old.stop().catch(() => {});
    }
    token = accessToken;

    const conn = new signalR.HubConnectionBuilder()
      .withUrl('/hubs/chat', { accessTokenFactory: () => token })
      .withAutomaticReconnect()
      .build();

    conn.on('addChatMessage', (message) => addItem(el.messages, String(message)));
    conn.on('showErrorMessage', (message) => showError(String(message)));
    conn.onreconnecting(() => {
      if (conn === connection) setStatus('Reconnecting…', null);
    });
    conn.onreconnected((id) => {
      if (conn === connection) setStatus('Connected', id);
    });
    conn.onclose((err) => {
      if (conn !== connection) return;
      setStatus('Disconnected', null);
      if (err) showError(`Connection closed: ${errorText(err)}`);
    });

    connection = conn;
    el.whoami.textContent = displayName || '—';
    setStatus('Connecting…', null);
    try {
      await conn.start();
    } catch (err) {
      if (conn === connection) {
        connection = null;
        setStatus('Disconnected', null);
        el.whoami.textContent = '—';
      }
      throw new Error(`Could not connect: ${errorText(err)}`);
    }
    if (conn === connection) {
      setStatus('Connected', conn.connectionId);
      el.to.focus();
    }
  }

  el.signinForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    const user = el.user.value.trim();
    const pasted = el.token.value.trim();
    el.signin.disabled = true;
    try {
      if (!el.tokenField.hidden && pasted) {
        await connect(pasted, tokenSubject(pasted) || user || 'token holder');
        return;
      }
      if (!user) {
        showError('Enter your name to sign in.');
        el.user.focus();
        return;
      }
      const devToken = await fetchDevToken(user);
      if (devToken === null) {
        showTokenField();
        showError('This server has no development sign-in: paste an access token (JWT) and sign in again.');
        return;
      }
      await connect(devToken, user);
    } catch (err) {
      showError(errorText(err));
    } finally {
      el.signin.disabled = false;
    }
  });

  el.sendForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    const to = el.to.value.trim();
    const message = el.message.value;
    if (!connection || connection.state !== signalR.HubConnectionState.Connected) {
      showError('Not connected: sign in first.');
      return;
    }
    if (!to || !message) return;
    try {
      await connection.invoke('SendChatMessage', to, message);
      el.message.value = '';
      el.message.focus();
    } catch (err) {
      showError(`Sending failed: ${errorText(err)}`);
    }
  });
})();
